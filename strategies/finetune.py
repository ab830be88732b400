"""Fine-tuning: the lower-bound reference that trains on each task in turn with no protection."""

from __future__ import annotations

from clbench.strategy import Strategy


class Finetune(Strategy):
    """Plain sequential training (the base class's behaviour), named for configs and tables."""

    name = "finetune"
    graph_safe = True  # its step hooks are recorded whole by trainer.cuda_graphs
    closed_form_safe = True  # cross-entropy on the model's forward: trainer.closed_form may train it
    population_safe = True  # a population member gives its solo run's R (tests/population)
