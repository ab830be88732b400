"""Bridges between clbench streams and other continual-learning libraries' benchmarks.

Each bridge module imports its library only inside its functions, so ``import clbench`` never pays for
(or needs) a library it does not use.
"""

from clbench.bridges.avalanche import from_avalanche, split_digits_benchmark, to_avalanche

__all__ = ["from_avalanche", "split_digits_benchmark", "to_avalanche"]
