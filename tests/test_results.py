"""Provenance in result.json (version, git state, strategy source hash) and the rerun of a stale result."""

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from clbench import results
from clbench.strategy import Strategy

TWO_SMALL_TASKS = ["stream.num_tasks=2", "stream.train_per_task=256"]


def _user_module(folder, name, body):
    (folder / f"{name}.py").write_text(
        "from clbench.strategy import Strategy\n\n\nclass Mine(Strategy):\n    name = 'mine'\n" + body
    )
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))


def test_source_digest_covers_a_user_module_and_the_base_class(tmp_path):
    module = _user_module(tmp_path, "my_strategy_a", "    strength = 1.0\n")
    first = results.source_digest(module.Mine)
    assert first["class"] == "my_strategy_a.Mine"
    assert set(first["files"]) == {"my_strategy_a.py", "clbench/strategy.py"}
    (tmp_path / "my_strategy_a.py").write_text((tmp_path / "my_strategy_a.py").read_text() + "# changed\n")
    second = results.source_digest(module.Mine)
    assert second["digest"] != first["digest"]
    assert second["files"]["clbench/strategy.py"] == first["files"]["clbench/strategy.py"]


def test_a_sub_package_strategy_hashes_its_helper_modules():
    from strategies.gradient_projection.gpm import GPM

    files = results.source_digest(GPM)["files"]
    assert "strategies/gradient_projection/projection.py" in files and "strategies/gradient_projection/gpm.py" in files


def test_git_state_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert results.git_state(tmp_path) == {}  # not a checkout
    git("init", "-q")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    (tmp_path / "tracked.py").write_text("a = 1\n")
    git("add", "tracked.py")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "y")
    clean = results.git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "untracked.txt").write_text("results do not make a tree dirty")
    assert results.git_state(tmp_path)["dirty"] is False
    (tmp_path / "tracked.py").write_text("a = 2\n")
    assert results.git_state(tmp_path)["dirty"] is True


def test_provenance_names_version_and_strategy_source():
    record = results.provenance(Strategy)
    assert record["clbench_version"] and record["strategy_source"]["class"] == "clbench.strategy.Strategy"
    assert len(record["git"]["commit"]) == 40 and "strategy_git" not in record  # this checkout, read once
    assert results.recorded_source_digest({"provenance": record}) == record["strategy_source"]["digest"]
    assert results.recorded_source_digest({}) is None


def test_a_user_module_in_another_checkout_records_that_checkouts_commit(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True)

    git("init", "-q")
    module = _user_module(tmp_path, "my_strategy_b", "    strength = 2.0\n")
    git("add", "my_strategy_b.py")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "x")
    record = results.provenance(module.Mine)
    assert record["strategy_git"] == {"commit": git("rev-parse", "HEAD").stdout.strip(), "dirty": False}
    assert record["git"]["commit"] != record["strategy_git"]["commit"]


def test_a_stale_result_is_rerun_and_resume_keep_keeps_it(run_tiny, tmp_path, capsys):
    first = run_tiny(TWO_SMALL_TASKS)
    module, _, name = first["provenance"]["strategy_source"]["class"].rpartition(".")
    strategy_class = getattr(importlib.import_module(module), name)
    assert first["provenance"]["strategy_source"]["digest"] == results.source_digest(strategy_class)["digest"]
    path = tmp_path / "results" / first["paths"]["result"].split("results/", 1)[1]
    stale = json.loads(path.read_text())
    stale["provenance"]["strategy_source"]["digest"] = "0ldc0de"
    stale["metrics"]["acc"] = -1.0  # a marker: a reused result would carry it
    path.write_text(json.dumps(stale))
    capsys.readouterr()

    kept = run_tiny([*TWO_SMALL_TASKS, "resume=keep"])
    assert kept["metrics"]["acc"] == -1.0 and "already completed" in capsys.readouterr().out

    rerun = run_tiny(TWO_SMALL_TASKS)
    lines = [line for line in capsys.readouterr().out.splitlines() if "0ldc0de" in line]
    assert len(lines) == 1 and "running it again" in lines[0] and "resume=keep" in lines[0]
    assert rerun["metrics"]["acc"] == pytest.approx(first["metrics"]["acc"])
    assert rerun["run_id"] == first["run_id"]
    assert json.loads(path.read_text())["provenance"]["strategy_source"]["digest"] != "0ldc0de"

    again = run_tiny(TWO_SMALL_TASKS)  # today's source: reused, not rerun
    assert again["started_at"] == rerun["started_at"] and "already completed" in capsys.readouterr().out


def test_resume_rejects_other_values(run_tiny):
    from clbench.runner import ConfigError

    with pytest.raises(ConfigError, match=r"resume.*keep"):
        run_tiny([*TWO_SMALL_TASKS, "resume=sometimes"])


def test_model_keys_at_their_off_value_leave_the_identity_as_before_they_existed():
    # What is asserted: a config from before model.checkpoint / model.freeze existed and the same config with
    # them at "nothing loaded, nothing frozen" have one identity (one run id, one report group: the old
    # fine-tune runs stay the baseline of new runs); set to anything else, they change it.
    before = {"stream": {"name": "s"}, "trainer": {"lr": 0.1}, "model": {"hidden": [8]}, "strategy": {}, "seed": 0}
    after = {**before, "model": {"hidden": [8], "checkpoint": None, "freeze": []}}
    digest = results.config_digest(results.experiment_identity(before))
    assert results.config_digest(results.experiment_identity(after)) == digest
    for key, value in (("checkpoint", "body.pt"), ("freeze", ["body"])):
        changed = {**before, "model": {**after["model"], key: value}}
        assert results.config_digest(results.experiment_identity(changed)) != digest


def test_a_pretrain_cache_checkpoint_is_identified_by_its_hash_not_by_the_results_dir():
    from clbench.pretrain import CACHE_FOLDER, CHECKPOINT_NAME

    def config(checkpoint: str) -> dict:
        return {"stream": {"name": "s"}, "trainer": {}, "model": {"checkpoint": checkpoint}, "strategy": {}, "seed": 0}

    here, there = (f"{root}/{CACHE_FOLDER}/ab12cd/{CHECKPOINT_NAME}" for root in ("results", "/scratch/me/results"))
    identity = results.experiment_identity(config(here))
    assert identity["model"]["checkpoint"] == "pretrain:ab12cd"
    assert results.config_digest(identity) == results.config_digest(results.experiment_identity(config(there)))
    other_recipe = f"results/{CACHE_FOLDER}/ef34ab/{CHECKPOINT_NAME}"
    assert results.experiment_identity(config(other_recipe))["model"]["checkpoint"] == "pretrain:ef34ab"
    # the cache files above are named by their folder, never read (none exists); any other file is read, and one
    # that is not there has an identity no completed run has, so the run goes on to the loader's error
    assert results.experiment_identity(config("/data/body.pt"))["model"]["checkpoint"] == "unreadable:/data/body.pt"


def _checkpoint_config(checkpoint: str | None, **model) -> dict:
    return {
        "stream": {"name": "s"},
        "trainer": {"lr": 0.1},
        "model": {"hidden": [8], "checkpoint": checkpoint, "freeze": [], **model},
        "strategy": {},
        "seed": 0,
    }


def _digest(config: dict) -> str:
    return results.config_digest(results.experiment_identity(config))


def test_a_user_checkpoint_enters_the_identity_by_its_content_not_its_path(tmp_path):
    # What is asserted: new weights saved into the same file give another run id (the path alone let a rerun
    # reuse the old weights' result); the same bytes under another name give the same run id.
    torch.manual_seed(0)
    body = tmp_path / "body.pt"
    torch.save({"weight": torch.randn(4, 4)}, body)
    first = _digest(_checkpoint_config(str(body)))
    assert results.experiment_identity(_checkpoint_config(str(body)))["model"]["checkpoint"].startswith("sha256:")
    torch.save({"weight": torch.randn(4, 4)}, body)  # same size, other weights
    assert _digest(_checkpoint_config(str(body))) != first
    copy = tmp_path / "elsewhere" / "copy.pt"
    copy.parent.mkdir()
    shutil.copyfile(body, copy)
    assert _digest(_checkpoint_config(str(copy))) == _digest(_checkpoint_config(str(body)))


def test_a_checkpoint_is_read_once_however_often_its_identity_is_asked(tmp_path, monkeypatch):
    """A file of a few hundred MB is hashed once per process while it stays as it is; saved again, once more."""
    reads = []
    file_digest = hashlib.file_digest
    monkeypatch.setattr(results.hashlib, "file_digest", lambda *a, **k: reads.append(1) or file_digest(*a, **k))
    body = tmp_path / "once.pt"
    torch.save({"weight": torch.zeros(3)}, body)
    an_hour_ago = time.time() - 3600
    os.utime(body, (an_hour_ago, an_hour_ago))
    for _ in range(3):
        results.experiment_identity(_checkpoint_config(str(body)))
    assert len(reads) == 1
    torch.save({"weight": torch.ones(3)}, body)  # same size
    after = results.experiment_identity(_checkpoint_config(str(body)))
    assert len(reads) == 2 and after["model"]["checkpoint"] == f"sha256:{hashlib.sha256(body.read_bytes()).hexdigest()}"


def test_a_file_written_just_now_is_never_taken_from_the_cache(tmp_path, monkeypatch):
    """File times tick in steps: two saves within one step into one file can leave size, times and inode equal, so
    a recently written file is hashed each time (a cached digest could be the first save's)."""
    monkeypatch.setattr(results, "_cached_sha256", lambda *key: "a digest from the cache")
    body = tmp_path / "racy.pt"
    for weights in (b"first weights", b"other weights"):
        body.write_bytes(weights)
        identity = results.experiment_identity(_checkpoint_config(str(body)))
        assert identity["model"]["checkpoint"] == f"sha256:{hashlib.sha256(weights).hexdigest()}"
    an_hour_ago = time.time() - 3600
    os.utime(body, (an_hour_ago, an_hour_ago))
    cached = results.experiment_identity(_checkpoint_config(str(body)))["model"]["checkpoint"]
    assert cached == "sha256:a digest from the cache"


def test_a_models_weights_folder_and_download_switch_leave_the_identity():
    # What is asserted: moving open_clip's cache folder (or downloading into it) keeps a run's id; the weights
    # tag and the architecture still change it.
    clip = {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "cache_dir": "/data/open_clip"}
    here = _digest(_checkpoint_config(None, **clip, download=False))
    moved = {**clip, "cache_dir": "/scratch/me/open_clip", "download": True}
    assert _digest(_checkpoint_config(None, **moved)) == here
    assert _digest(_checkpoint_config(None, **{**clip, "pretrained": "openai"})) != here
    assert _digest(_checkpoint_config(None, **{**clip, "model_name": "ViT-B-16"})) != here


def test_a_rerun_after_new_weights_were_saved_into_the_checkpoint_trains_again(run_tiny, tmp_path, cli_error_line):
    """End to end: the same command with the same file reuses its result; with new weights in that file it is a
    new run; with the file gone it stops with the loader's one-line error, not with an old result."""
    from clbench.models import MLP

    body = tmp_path / "mlp.pt"
    overrides = [*TWO_SMALL_TASKS, "plots=false", f"model.checkpoint={body}"]
    torch.manual_seed(1)
    torch.save(MLP((1, 28, 28), [10], hidden=[100, 100]).state_dict(), body)
    first = run_tiny(overrides)
    assert run_tiny(overrides)["started_at"] == first["started_at"]  # resumed: already completed
    torch.manual_seed(2)
    torch.save(MLP((1, 28, 28), [10], hidden=[100, 100]).state_dict(), body)
    second = run_tiny(overrides)
    assert second["run_id"] != first["run_id"] and second["status"] == "completed"
    assert second["metrics"]["acc"] != first["metrics"]["acc"]
    body.unlink()  # the CLI's one line (exit code 2), not the result of weights that are gone
    assert f"model.checkpoint={body}: no such file" in cli_error_line([*overrides, "device=cpu"], tmp_path / "results")


def test_package_versions_are_read_once_and_each_caller_gets_its_own_dict():
    from clbench.results import package_versions

    first = package_versions()
    first["torch"] = "edited by a caller"
    assert package_versions()["torch"] != "edited by a caller"


def test_package_versions_are_read_from_the_installed_metadata_once_per_process(monkeypatch):
    from importlib import metadata

    from clbench import results

    calls = []
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: calls.append(name) or real(name))
    results._package_versions.cache_clear()
    try:
        first, second = results.package_versions(), results.package_versions()
    finally:
        results._package_versions.cache_clear()
    assert first == second and len(calls) == len(results.VERSIONED_PACKAGES)
