"""clbench: a continual-learning benchmark harness (streams, strategies, accuracy-matrix metrics)."""

__version__ = "0.1.0"
