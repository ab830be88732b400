"""Pretrained bodies: ``model.checkpoint=PATH`` loads a model's body from a local file, ``model.freeze=[...]``
keeps parts of it fixed. The heads are always new (the stream's head sizes); nothing is downloaded.

A checkpoint file may be

* clbench's pretraining checkpoint (:mod:`clbench.pretrain`: ``{"model": body, "control_head": ..., ...}``);
* a clbench run's ``checkpoint.pt`` (``results/<stream>/<strategy>/<run id>/``: the model its strategy trained);
* a plain ``state_dict`` (or ``{"state_dict": ...}``), e.g. ``torch.save(model.state_dict(), PATH)``; a model
  whose keys differ from the file's (the torchvision wrappers) maps them in ``adapt_state_dict``.

Every key of the body must be in the file with its shape, and the file may hold nothing else but heads: a
checkpoint made with another model config stops the run before training, with one line. ``model.checkpoint``
may also be the word ``pretrain``: the checkpoint the config's ``pretrain:`` block makes (and caches), which
:func:`clbench.pretrain.resolve_checkpoint` replaces by that file's path before the model is built.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from clbench.schema import ConfigError

if TYPE_CHECKING:
    from clbench.models.heads import ContinualModel

PRETRAIN_TOKEN = "pretrain"  # model.checkpoint=pretrain: the file the config's pretrain: block makes
HEADS_PREFIX = "heads."
BODY = "body"  # model.freeze=[body]: everything but the heads
HEADS = "heads"
SHOWN_KEYS = 3  # how many offending keys an error line names


def apply_checkpoint(model: ContinualModel, checkpoint: str | None, freeze: Sequence[str]) -> None:
    """Load ``checkpoint``'s body into ``model`` (heads stay as built), then freeze the parts ``freeze`` names.

    Called at the end of each clbench model's ``__init__``, so every way of building a model (the runner, the
    conformance kit, a test's ``instantiate``) gets the same weights."""
    if checkpoint is not None:
        load_body(model, read_body_state(checkpoint), str(checkpoint))
    if freeze:
        freeze_parts(model, freeze)


def read_body_state(checkpoint: str | Path) -> dict[str, Tensor]:
    """The state dict in ``checkpoint`` (one of the formats in the module docstring), without any head."""
    if str(checkpoint) == PRETRAIN_TOKEN:
        raise ConfigError(
            "model.checkpoint=pretrain names the checkpoint of the config's pretrain: block, which the runner "
            "makes; build the model through clbench.runner.run or pass a file path"
        )
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"model.checkpoint={checkpoint}: no such file; make one with `python -m clbench.pretrain protocol=...` "
            "(or use a run's checkpoint.pt, or `torch.save(model.state_dict(), PATH)`), or set model.checkpoint=null"
        )
    try:
        # the user names this file as they name code to run; clbench's own run checkpoints hold numpy arrays,
        # which torch's weights-only loader refuses
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ConfigError(f"model.checkpoint={checkpoint} cannot be read ({error}): give a torch.save file") from None
    state = _state_in(loaded)
    if state is None:
        raise ConfigError(
            f"model.checkpoint={checkpoint} holds no state dict (found {type(loaded).__name__}): give a file made by "
            "torch.save(model.state_dict(), PATH), clbench.pretrain or a clbench run"
        )
    return {key: value for key, value in state.items() if not key.startswith(HEADS_PREFIX)}


def _state_in(loaded: Any) -> Mapping[str, Tensor] | None:
    """The model state inside a loaded checkpoint, whichever of the accepted formats it has."""
    if not isinstance(loaded, Mapping):
        return None
    if "control_head" in loaded and isinstance(loaded.get("model"), Mapping):  # clbench.pretrain
        return loaded["model"]
    strategy = loaded.get("strategy")
    if "next_task" in loaded and isinstance(strategy, Mapping) and isinstance(strategy.get("model"), Mapping):
        return strategy["model"]  # a clbench run's checkpoint.pt
    if isinstance(loaded.get("state_dict"), Mapping):
        return loaded["state_dict"]
    if loaded and all(isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()):
        return loaded
    return None


def body_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model``'s state dict without its heads: what a pretraining checkpoint stores as ``"model"``."""
    return {key: value for key, value in model.state_dict().items() if not key.startswith(HEADS_PREFIX)}


def load_body(model: ContinualModel, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``model``'s body; every body key must be there with its shape, and nothing more."""
    state = model.adapt_state_dict(dict(state))
    expected = body_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    problems = [
        f"{len(keys)} {what} (e.g. {', '.join(keys[:SHOWN_KEYS])})"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
        if keys
    ]
    if problems:
        raise ConfigError(
            f"model.checkpoint={source} does not fit {type(model).__name__}: {'; '.join(problems)}; "
            "use the model config the checkpoint was made with"
        )
    model.load_state_dict(state, strict=False)  # the heads are new: the stream's head sizes


def freeze_parts(model: ContinualModel, names: Sequence[str]) -> list[str]:
    """Stop training the parameters ``names`` select (``body``, ``heads``, or a parameter-name prefix such as
    ``patch_embed`` or ``blocks.0.mlp``); return the frozen parameter names.

    Frozen parameters get ``requires_grad=False``, so no strategy's optimizer or importance estimate sees them
    (:meth:`clbench.strategy.Strategy.parameters` leaves them out); batch-norm running statistics, being
    buffers, are not frozen by this."""
    parameters = dict(model.named_parameters())
    frozen: list[str] = []
    for name in names:
        chosen = [key for key in parameters if _selects(str(name), key)]
        if not chosen:
            parts = sorted({key.split(".")[0] for key in parameters} - {HEADS})
            raise ConfigError(
                f"model.freeze: {name!r} names no part of {type(model).__name__}: use {BODY}, {HEADS} or a "
                f"parameter-name prefix (its parts: {', '.join(parts)})"
            )
        frozen += [key for key in chosen if key not in frozen]
    for key in frozen:
        parameters[key].requires_grad_(False)
    return frozen


def _selects(name: str, key: str) -> bool:
    """Whether the freeze entry ``name`` covers the parameter ``key``."""
    in_heads = key.startswith(HEADS_PREFIX)
    if name == BODY:
        return not in_heads
    return key == name or key.startswith(f"{name}.")
