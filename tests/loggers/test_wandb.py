"""The W&B logger, offline: the run directory holds the accuracy matrix as tables and heatmaps."""

import json
from pathlib import Path

import numpy as np


def test_offline_run_contains_accuracy_matrix_table(run_tiny, tmp_path):
    result = run_tiny(["stream=split_digits", "logger=wandb", "logger.mode=offline"])
    run_dir = Path(result["paths"]["run_dir"])
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "expected exactly one offline W&B run"
    tables = sorted((offline[0] / "files" / "media" / "table").rglob("*.table.json"))
    acc_tables = [t for t in tables if "acc_matrix" in str(t.relative_to(offline[0]))]
    assert acc_tables, "no accuracy-matrix table was logged"
    final = [t for t in acc_tables if "final" in str(t)]
    content = json.loads(final[0].read_text())
    assert content["columns"][0] == "after_task" and len(content["columns"]) == 6
    logged = np.array([row[1:] for row in content["data"]], dtype=float)
    assert np.allclose(logged, np.array(result["acc_matrix"]))
    heatmaps = list((offline[0] / "files" / "media" / "images").rglob("*.png"))
    assert heatmaps, "no heatmap image was logged"
    assert not list(offline[0].rglob("*histogram*"))


def _images(result) -> list[str]:
    (offline,) = (Path(result["paths"]["run_dir"]) / "wandb").glob("offline-run-*")
    return sorted(str(p.relative_to(offline)) for p in (offline / "files" / "media" / "images").rglob("*.png"))


def test_heatmaps_are_final_by_default_and_per_task_on_request(run_tiny, tmp_path):
    final_only = _images(run_tiny(["stream=split_digits", "logger=wandb"], tmp_path / "a"))
    assert final_only and all("final" in name for name in final_only)
    assert any("final/acc_matrix" in name for name in final_only)
    overrides = ["stream=split_digits", "logger=wandb", "logger.heatmaps_every_task=true"]
    every = _images(run_tiny(overrides, tmp_path / "b"))
    per_task = [name for name in every if "final" not in name]
    assert len(per_task) == 5  # one heatmap of R after each of the 5 tasks
