"""The independent reference (one model per task) on streams it cannot answer for."""

from __future__ import annotations

import pytest


def test_a_stream_without_square_r_is_an_unsupported_pair(run_tiny):
    """On SCoLe the one evaluation set (the full test split) is no training task, so no task id names the model to
    answer it: the run used to read its id 0 and let task 0's two-class model answer every row (9.9 % on
    scole_mnist5k, chance). It must stop with one line that a comparison sweep records as skipped."""
    from clbench.__main__ import _is_skip

    with pytest.raises(ValueError, match="square R") as raised:
        run_tiny(
            ["protocol=scole_mnist5k", "strategy=independent", "stream.num_tasks=4", "stream.samples_per_class=20"]
        )
    assert _is_skip(raised.value)


def test_a_square_stream_still_runs(run_tiny):
    """The check leaves the streams it is defined on alone: one model per task, each read on its own task."""
    result = run_tiny(
        ["stream=permuted_mnist5k", "stream.num_tasks=2", "stream.train_per_task=50", "strategy=independent"]
    )
    assert result["status"] == "completed" and len(result["acc_matrix"]) == 2 == len(result["acc_matrix"][0])
