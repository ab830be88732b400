"""Pretraining with a cache: a model body trained once on a dataset clbench loads, then reused by every run.

A protocol that starts from a pretrained model (``conf/protocol/pretrained_fmnist.yaml``) holds a ``pretrain:``
node (:class:`Pretraining`: the dataset, its classes, epochs, optimizer, seed) and sets
``model.checkpoint=pretrain``. Before the run builds anything, :func:`resolve_checkpoint` replaces that word by the
cache file ``<results_dir>/_pretrained/<hash>/checkpoint.pt``, the hash being that of the pretraining recipe and the
model's architecture (not of paths), and pretrains first when the file is missing: one line says so. Every later
run with the same recipe (any strategy, any seed of the stream) loads the same body.

The checkpoint is a dict (what the control set of :mod:`clbench` reads through :func:`load_control_head`):
``"model"`` (the body's state dict, heads left out), ``"control_head"`` (``{"weight", "bias"}`` of the pretraining
classifier), ``"classes"`` (the original labels of its outputs, in order), ``"dataset"`` (the dataset's name),
``"config"`` (the pretraining recipe and model config) and ``"test_accuracy"`` (percent, on the pretraining
classes' test images). It is written atomically, under a lock, so an interrupted pretraining leaves no file and
two jobs missing the same cache train it once.

``python -m clbench.pretrain protocol=pretrained_fmnist [overrides]`` fills the cache without running the stream.
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from clbench.lock import NO_FLOCK
from clbench.models.pretrained import PRETRAIN_TOKEN, body_state_dict
from clbench.optim import torch_optimizer
from clbench.results import (
    MODEL_KEYS_OFF,
    PRETRAIN_CHECKPOINT,
    PRETRAIN_FOLDER,
    atomic_torch_save,
    config_digest,
    without_paths,
)
from clbench.schema import AtLeast, ConfigError, NonNegative, Positive, PositiveInt
from clbench.streams import Stream, class_subset_stream

CACHE_FOLDER, CHECKPOINT_NAME = PRETRAIN_FOLDER, PRETRAIN_CHECKPOINT  # defined once, where run identity reads them
LOCK_NAME = ".lock"
# model keys that say where the weights come from, not what the network is: left out of the cache's hash
LOADING_KEYS = tuple(MODEL_KEYS_OFF)


@dataclass
class Pretraining:
    """A pretraining recipe (the protocol's ``pretrain:`` node): supervised training of the model with one
    linear classifier over ``classes`` of ``dataset`` (all of them when null), every training image of those
    classes, ``epochs`` epochs of shuffled mini-batches, then the test accuracy on their test images."""

    dataset: dict[str, Any]  # a dataset node, e.g. {_target_: clbench.data.load_fashion_mnist, root: ...}
    classes: list[int] | None = None
    epochs: PositiveInt = 5
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1000
    lr: Annotated[float, Positive()] = 1e-3
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    momentum: NonNegative = 0.0
    weight_decay: NonNegative = 0.0
    seed: Annotated[int, AtLeast(0)] = 0

    @classmethod
    def from_config(cls, node: DictConfig | dict[str, Any]) -> Pretraining:
        """The recipe of a config node (its dataset node stays a plain dict, loaded only when training)."""
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        assert isinstance(values, dict)
        values.pop("_target_", None)
        return cls(**{str(k): v for k, v in values.items()})


def cache_key(pretraining: Pretraining, model_config: dict[str, Any]) -> str:
    """The hash naming a pretraining's cache folder: the recipe and the architecture, without data paths, without
    the model's weights folder and download switch (open_clip's ``cache_dir`` / ``download``: moving that folder
    must not name another cache, and so another ``pretrain:<hash>`` run id) and without the model's own loading
    keys (``checkpoint``, ``freeze``). A model without such keys (the ViT, the MLP) keeps the key it had."""
    model = without_paths({k: v for k, v in model_config.items() if k not in LOADING_KEYS})
    return config_digest({"pretrain": without_paths(asdict(pretraining)), "model": model})


def _model_config(cfg: DictConfig) -> dict[str, Any]:
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    return {str(k): v for k, v in model.items()}


def checkpoint_path(cfg: DictConfig) -> Path:
    """Where the config's ``pretrain:`` recipe caches its checkpoint (pure: reads the config, trains nothing)."""
    if cfg.get("pretrain") is None:
        raise ConfigError(
            "model.checkpoint=pretrain needs a pretrain: block in the config (e.g. protocol=pretrained_fmnist): "
            "add one, or give model.checkpoint a file path"
        )
    key = cache_key(Pretraining.from_config(cfg.pretrain), _model_config(cfg))
    return Path(str(cfg.results_dir)) / CACHE_FOLDER / key / CHECKPOINT_NAME


def resolve_checkpoint(cfg: DictConfig, device: torch.device | str = "cpu") -> Path | None:
    """Replace ``model.checkpoint=pretrain`` by the cached checkpoint's path, pretraining first when the cache
    is missing; None (and nothing changed) when the model does not ask for it.

    Runs before the run seeds its generators, so a run's stream training is the same whether the cache was
    there or not."""
    if cfg.model.get("checkpoint") != PRETRAIN_TOKEN:
        return None
    path = checkpoint_path(cfg)
    with _cache_lock(path.parent):
        if not path.is_file():
            if cfg.get("cpu_threads") is not None:  # as the run will: oversubscribed threads spin on a shared CPU
                torch.set_num_threads(int(cfg.cpu_threads))
            pretraining = Pretraining.from_config(cfg.pretrain)
            print(
                f"clbench: pretraining {str(cfg.model._target_).rsplit('.', 1)[-1]} on "
                f"{_dataset_name(pretraining)} classes {pretraining.classes or 'all'} "
                f"({pretraining.epochs} epochs) into {path}",
                flush=True,
            )
            checkpoint = pretrain(pretraining, _model_config(cfg), torch.device(device))
            atomic_torch_save(checkpoint, path)
    cfg.model.checkpoint = str(path)
    return path


def _dataset_name(pretraining: Pretraining) -> str:
    """The dataset a recipe loads, named from its loader (``clbench.data.load_fashion_mnist``: fashion_mnist)."""
    return str(pretraining.dataset.get("_target_", "dataset")).rsplit(".", 1)[-1].removeprefix("load_")


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock (waiting for it): two jobs that miss the same cache pretrain once. Where the
    filesystem has no flock (clbench.lock.NO_FLOCK) it goes on unlocked: the checkpoint is written atomically,
    so the worst case is two jobs pretraining the same file."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            if error.errno not in NO_FLOCK:
                raise
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pretraining_stream(pretraining: Pretraining) -> Stream:
    """The pretraining data as a one-task stream over ``classes`` (outputs in that order), so its inputs are
    normalised exactly as a stream over the same dataset normalises them."""
    dataset = instantiate(pretraining.dataset)
    classes = list(range(dataset.num_classes)) if pretraining.classes is None else list(pretraining.classes)
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(dataset.num_classes)):
        raise ConfigError(
            f"pretrain.classes={classes} must list distinct classes of {dataset.name} "
            f"(0..{dataset.num_classes - 1}), or be null for all of them"
        )
    return class_subset_stream(dataset, classes)


def pretrain(pretraining: Pretraining, model_config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Train a fresh model of ``model_config`` on the recipe's data and return the checkpoint dict (see the
    module docstring). The recipe's seed fixes the initial weights and the batch order."""
    stream = pretraining_stream(pretraining).to(device)
    task = stream.tasks[0]
    torch.manual_seed(pretraining.seed)
    generator = torch.Generator(device="cpu").manual_seed(pretraining.seed)
    model_config = {**model_config, "checkpoint": None, "freeze": []}
    model: nn.Module = instantiate(
        model_config, input_shape=list(stream.input_shape), head_sizes=[task.num_outputs]
    ).to(device)
    optimizer = torch_optimizer(
        pretraining.optimizer, model.parameters(), pretraining.lr, pretraining.momentum, pretraining.weight_decay
    )
    started = time.perf_counter()
    model.train()
    for _ in range(pretraining.epochs):
        order = torch.randperm(len(task.train_index), generator=generator).to(device)
        for batch in order.split(pretraining.batch_size):
            x = stream.inputs("train", task.train_index[batch], 0)
            loss = F.cross_entropy(model(x, 0), task.train_targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    correct = torch.zeros((), device=device)
    with torch.no_grad():
        for batch in torch.arange(len(task.test_index), device=device).split(pretraining.eval_batch_size):
            x = stream.inputs("test", task.test_index[batch], 0)
            correct += (model(x, 0).argmax(1) == task.test_targets[batch]).sum()
    head = model.heads.heads[0]
    return {
        "model": {k: v.detach().cpu() for k, v in body_state_dict(model).items()},
        "control_head": {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()},
        "classes": [int(c) for c in task.classes],
        "dataset": str(stream.info["dataset"]),
        "config": {"pretrain": asdict(pretraining), "model": model_config},
        "test_accuracy": 100.0 * float(correct) / max(1, len(task.test_index)),
        "train_seconds": time.perf_counter() - started,
    }


def load_control_head(path: str | Path) -> tuple[nn.Linear, list[int], str]:
    """The pretraining classifier of a checkpoint made here, as a linear layer over ``model.features(x)``, with
    the original labels of its outputs (in order) and the name of the dataset they come from."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "control_head" not in checkpoint:
        raise ConfigError(
            f"{path} is not a clbench pretraining checkpoint (no control_head): make it with clbench.pretrain"
        )
    weight, bias = checkpoint["control_head"]["weight"], checkpoint["control_head"]["bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        head.weight.copy_(weight)
        if bias is not None:
            head.bias.copy_(bias)
    return head, [int(c) for c in checkpoint["classes"]], str(checkpoint["dataset"])


def main(argv: list[str] | None = None) -> None:
    """``python -m clbench.pretrain protocol=... [overrides]``: fill the pretraining cache, print its path."""
    from hydra import compose, initialize_config_dir

    from clbench.__main__ import CONFIG_DIR, USER_ERROR_EXIT
    from clbench.data import DatasetMissingError
    from clbench.runner import select_device
    from clbench.schema import check_config
    from clbench.sweeps import register_resolvers

    register_resolvers()
    overrides = list(sys.argv[1:] if argv is None else argv)
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        check_config(cfg)
        if cfg.model.get("checkpoint") != PRETRAIN_TOKEN:
            raise ConfigError(
                "this config pretrains nothing: use a protocol with a pretrain: block (model.checkpoint=pretrain)"
            )
        path = resolve_checkpoint(cfg, select_device(str(cfg.device)))
    except (ConfigError, DatasetMissingError) as error:
        print(f"clbench: error: {error}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    print(f"{path} (test accuracy {checkpoint['test_accuracy']:.2f} %)")


if __name__ == "__main__":
    main()
