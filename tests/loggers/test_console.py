"""The console logger: a sweep's lines say whose they are, and a run's closing block is one write."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from clbench.loggers.base import RunInfo
from clbench.loggers.console import ConsoleLogger


class Writes(io.StringIO):
    """stdout that remembers each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def run_info(seed: int = 2) -> RunInfo:
    return RunInfo("r", Path("/tmp/r"), "pmnist", "finetune", "domain", seed, ["a", "b"], num_tasks=2)


def result() -> dict:
    return {
        "acc_matrix": [[90.0, 10.0], [80.0, 95.0]],
        "random_init_acc": [10.0, 9.0],
        "status": "completed",
        "metrics": {"acc": 87.5, "bwt": -10.0},
        "strategy": "finetune",
        "stream": "pmnist",
        "seed": 2,
        "paths": {"result": "/tmp/r/result.json"},
    }


def test_a_sweep_job_names_its_run_on_each_line_a_single_run_does_not(monkeypatch):
    matrix = np.array([[90.0, 10.0], [80.0, 95.0]])
    for tagged, expected in ((True, "  [finetune seed 2] after task 0:"), (False, "  after task 0:")):
        out = Writes()
        monkeypatch.setattr("sys.stdout", out)
        logger = ConsoleLogger(tagged=tagged)
        logger.start(run_info())
        logger.log_task(0, matrix, np.array([10.0, 9.0]))
        assert out.getvalue().splitlines()[1].startswith(expected)


def test_the_closing_block_is_one_write(monkeypatch):
    """Worker processes print at once: a block written in pieces could take another run's lines inside it."""
    out = Writes()
    monkeypatch.setattr("sys.stdout", out)
    logger = ConsoleLogger(tagged=True)
    logger.start(run_info())
    before = len(out.calls)
    logger.finish(result())
    (block,) = [call for call in out.calls[before:] if call]  # print writes its (empty) end apart
    assert block.startswith("acc_matrix (%)") and block.endswith("result: /tmp/r/result.json\n")
    assert "finetune on pmnist (seed 2): ACC 87.50%" in block
