"""Pretraining with a cache: the checkpoint contract, reuse, the cache key, interruption, and the protocol."""

import pytest
import torch
from omegaconf import OmegaConf

from clbench import pretrain
from clbench.data import load_digits
from clbench.models import MLP
from clbench.models.pretrained import PRETRAIN_TOKEN
from clbench.pretrain import Pretraining, cache_key, checkpoint_path, load_control_head, resolve_checkpoint
from clbench.schema import ConfigError

DIGITS = {"_target_": "clbench.data.load_digits"}
MLP_CONFIG = {"_target_": "clbench.models.MLP", "hidden": [32], "bias": True}
MLP_CONFIG.update(checkpoint=PRETRAIN_TOKEN, freeze=[])


def _cfg(tmp_path, **recipe):
    """A config with a small pretraining recipe (sklearn's digits 0-2, an MLP) and model.checkpoint=pretrain."""
    node = {"_target_": "clbench.pretrain.Pretraining", "dataset": DIGITS, "classes": [2, 0, 1], "epochs": 3}
    return OmegaConf.create(
        {"results_dir": str(tmp_path), "model": dict(MLP_CONFIG), "pretrain": {**node, "batch_size": 32, **recipe}}
    )


def test_the_checkpoint_keeps_the_contract_and_its_head_reproduces_its_accuracy(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    path = resolve_checkpoint(cfg)
    assert path == tmp_path / "_pretrained" / path.parent.name / "checkpoint.pt" and path.is_file()
    assert cfg.model.checkpoint == str(path)  # what the model (and the control set) then read
    assert "clbench: pretraining MLP on digits classes [2, 0, 1] (3 epochs)" in capsys.readouterr().out
    saved = torch.load(path, weights_only=True)
    assert {"model", "control_head", "classes", "dataset", "config", "test_accuracy"} <= set(saved)
    assert not any(key.startswith("heads.") for key in saved["model"])
    assert saved["classes"] == [2, 0, 1] and saved["dataset"] == "digits"
    assert saved["config"]["pretrain"]["epochs"] == 3 and saved["config"]["model"]["hidden"] == [32]
    # the accuracy recomputed from the file alone: a model loading the body, the control head on its features
    head, classes, dataset = load_control_head(path)
    model = MLP((1, 8, 8), [3], hidden=[32], checkpoint=str(path)).eval()
    stream = pretrain.pretraining_stream(Pretraining.from_config(cfg.pretrain))
    task = stream.tasks[0]
    with torch.no_grad():
        predicted = head(model.features(stream.inputs("test", task.test_index, 0))).argmax(1)
    labels = torch.tensor(classes)[predicted]  # output k is original label classes[k]
    accuracy = 100.0 * float((labels == load_digits().y_test[task.test_index]).float().mean())
    assert dataset == "digits"
    assert accuracy == pytest.approx(saved["test_accuracy"], abs=1e-4)  # same images right: one image is 0.47 points
    assert saved["test_accuracy"] > 80  # three well-separated digits: far above chance (33 %)


def test_a_second_run_reuses_the_cache(tmp_path, capsys, monkeypatch):
    first = resolve_checkpoint(_cfg(tmp_path))
    written = first.stat().st_mtime_ns
    capsys.readouterr()
    monkeypatch.setattr(pretrain, "pretrain", lambda *args: pytest.fail("pretrained again"))
    assert resolve_checkpoint(_cfg(tmp_path)) == first
    assert first.stat().st_mtime_ns == written and "pretraining" not in capsys.readouterr().out


def test_the_cache_key_follows_the_recipe_and_architecture_not_paths_or_loading_keys(tmp_path):
    base = Pretraining.from_config(_cfg(tmp_path).pretrain)
    key = cache_key(base, MLP_CONFIG)
    assert cache_key(Pretraining(**{**base.__dict__, "epochs": 4}), MLP_CONFIG) != key
    assert cache_key(Pretraining(**{**base.__dict__, "classes": [0, 1, 2]}), MLP_CONFIG) != key
    assert cache_key(base, {**MLP_CONFIG, "hidden": [64]}) != key
    assert cache_key(base, {**MLP_CONFIG, "checkpoint": "x.pt", "freeze": ["body"]}) == key
    moved = Pretraining(**{**base.__dict__, "dataset": {**DIGITS, "root": "/elsewhere"}})
    assert cache_key(moved, MLP_CONFIG) == key


def test_an_interrupted_pretraining_leaves_no_file_and_the_next_run_pretrains(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pretrain, "pretrain", interrupted)
        with pytest.raises(KeyboardInterrupt):
            resolve_checkpoint(_cfg(tmp_path))
    path = checkpoint_path(_cfg(tmp_path))
    assert not path.exists() and not list(path.parent.glob("*.pt*"))
    assert resolve_checkpoint(_cfg(tmp_path)) == path and path.is_file()


def test_a_model_without_the_token_is_left_alone(tmp_path):
    cfg = _cfg(tmp_path)
    cfg.model.checkpoint = None
    assert resolve_checkpoint(cfg) is None and cfg.model.checkpoint is None
    assert not (tmp_path / "_pretrained").exists()


def test_the_token_without_a_recipe_is_one_line(tmp_path):
    cfg = OmegaConf.create({"results_dir": str(tmp_path), "model": dict(MLP_CONFIG)})
    with pytest.raises(ConfigError, match=r"model\.checkpoint=pretrain needs a pretrain: block"):
        resolve_checkpoint(cfg)


def test_bad_classes_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"pretrain.classes=\[0, 0\] must list distinct classes of digits"):
        resolve_checkpoint(_cfg(tmp_path, classes=[0, 0]))


def test_the_protocol_pretrains_once_then_runs_from_the_cache(run_tiny, tmp_path, capsys):
    """protocol=pretrained_fmnist with the MLP, tiny: `python -m clbench.pretrain` fills the cache, the run then
    loads it without pretraining, starts from its body, and its control set reads the pretraining accuracy."""
    results = tmp_path / "results"
    small = ["protocol=pretrained_fmnist", "model=mlp", "pretrain.epochs=1"]
    pretrain.main([*small, f"results_dir={results}", "device=cpu"])
    printed = capsys.readouterr().out
    assert "clbench: pretraining MLP on fashion_mnist classes [0, 1, 2, 3, 4] (1 epochs)" in printed
    (path,) = (results / "_pretrained").glob("*/checkpoint.pt")
    result = run_tiny([*small, "strategy=finetune", "stream.train_per_task=100", "plots=false"], results)
    assert "pretraining" not in capsys.readouterr().out
    assert result["status"] == "completed" and result["protocol"] == "pretrained_fmnist"
    assert result["config"]["model"]["checkpoint"] == str(path)
    saved = torch.load(path, weights_only=True)
    assert saved["test_accuracy"] > 70  # five Fashion-MNIST classes after one epoch of an MLP
    assert result["control_acc_before"] == pytest.approx(saved["test_accuracy"], abs=0.1)


@pytest.mark.parametrize(
    ("override", "message"),
    [("pretrain.epochs=0", "pretrain.epochs must be >= 1"), ("pretrain.optimizer=lbfgs", "pretrain.optimizer must be")],
)
def test_a_bad_recipe_value_is_caught_by_the_config_check(compose_cfg, tmp_path, override, message):
    from clbench.schema import check_config

    with pytest.raises(ConfigError, match=message):
        check_config(compose_cfg(["protocol=pretrained_fmnist", override], tmp_path))


def test_the_cache_lock_goes_on_unlocked_where_the_filesystem_has_no_flock(tmp_path, monkeypatch):
    """On NFS without a lock daemon flock raises ENOLCK: every model.checkpoint=pretrain run died there."""
    import errno

    from clbench import pretrain

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(pretrain.fcntl, "flock", refuse)
    entered = []
    with pretrain._cache_lock(tmp_path / "cache"):
        entered.append(True)
    assert entered == [True]

    def broken(handle, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(pretrain.fcntl, "flock", broken)
    with pytest.raises(OSError), pretrain._cache_lock(tmp_path / "cache"):
        pass


def test_the_cache_key_leaves_out_the_models_weights_folder_and_download_switch(tmp_path, compose_cfg):
    # What is asserted: moving open_clip's weights folder (or downloading into it) names the same cache, and so the
    # same pretrain:<hash> run id; the weights tag still names another. The protocol's ViT and MLP keep the keys
    # they had before the model's paths were filtered (their caches stay valid).
    recipe = Pretraining.from_config(_cfg(tmp_path).pretrain)
    clip = {"_target_": "clbench.models.torchvision_nets.OpenCLIPImage", "model_name": "ViT-B-32"}
    clip.update(pretrained="laion2b_s34b_b79k", cache_dir="/data/open_clip", download=False)
    clip.update(image_size=224, checkpoint=PRETRAIN_TOKEN, freeze=[])
    key = cache_key(recipe, clip)
    assert cache_key(recipe, {**clip, "cache_dir": "/scratch/me/open_clip", "download": True}) == key
    assert cache_key(recipe, {**clip, "pretrained": "openai"}) != key
    for model, before in (("vit", "85b688f4"), ("mlp", "c399a95c")):
        cfg = compose_cfg(["protocol=pretrained_fmnist", f"model={model}"], tmp_path)
        assert checkpoint_path(cfg) == tmp_path / "_pretrained" / before / "checkpoint.pt"
