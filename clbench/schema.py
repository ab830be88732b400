"""The typed schema of a composed clbench config: every key's type and range, checked before training.

Bad input must stop before the first step with one line that names the fix. The checks live here, in one
place, instead of being scattered through the code that reads the values:

* every node with a ``_target_`` (stream, its dataset, model, strategy, trainer, logger, ...) may only hold
  the keys its target accepts (the parameters of the class's ``__init__`` or of the function), and each
  value must fit that parameter's type hint; a strategy written by a user is checked from its own
  signature, with nothing to register;
* the dataclasses below add ranges (``Annotated[int, AtLeast(1)]``) to the keys that every run shares:
  the top level, the trainer and the stream; a strategy can state its own ranges the same way, in the type
  hints of its ``__init__``;
* an unknown key gets the nearest known one ("did you mean trainer.epochs?", :func:`difflib.get_close_matches`).

It checks the config after Hydra composed it, so a new config group (a protocol, per-protocol settings)
needs no change here unless it adds a top-level key.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import math
import os
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
HYDRA_KEYS = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the fix."""


@dataclass(frozen=True)
class Range:
    """Bounds on a number: ``low <= value`` (``low < value`` when ``low_open``), likewise for ``high``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        return " and ".join(parts)


def AtLeast(low: float) -> Range:
    """``Annotated[int, AtLeast(1)]``: the value must be >= ``low``."""
    return Range(low=low)


def Positive() -> Range:
    """``Annotated[float, Positive()]``: the value must be > 0."""
    return Range(low=0, low_open=True)


class NonEmpty:
    """``Annotated[str, NonEmpty()]``: the string must not be empty."""


PositiveInt = Annotated[int, AtLeast(1)]
Count = Annotated[int, AtLeast(0)]
NonNegative = Annotated[float, AtLeast(0)]
Fraction = Annotated[float, Range(0, 1, high_open=True)]


@dataclass
class RunSchema:
    """Top-level keys of ``conf/config.yaml`` and those the config groups add (protocol, settings, presets).
    The groups themselves (stream, model, strategy, trainer, logger) are checked by their ``_target_``."""

    seed: int
    device: str
    deterministic: bool
    cpu_threads: Annotated[int, AtLeast(1)] | None
    results_dir: Annotated[str, NonEmpty()]
    data_root: str
    resume: Literal[True, False, "keep"]  # keep: reuse a completed result made by other strategy source
    run_id: str | None
    verbose: bool
    plots: bool
    count_flops: Literal["auto", True, False]  # auto: in sweeps only
    protocol_name: str | None  # set by conf/protocol/<name>.yaml
    strategy_settings: str | None  # set by conf/settings/<protocol>/<strategy>.yaml
    experiment: str | None
    control: dict[str, Any] | None  # conf/control/<name>.yaml (a _target_ node) or null (control=none)


@dataclass
class TrainerSchema:
    """Ranges of ``conf/trainer`` keys (types and the key set come from ``clbench.trainer.Trainer``)."""

    epochs: PositiveInt
    batch_size: PositiveInt
    eval_batch_size: PositiveInt
    lr: Annotated[float, Positive()]
    momentum: NonNegative
    weight_decay: NonNegative
    nan_checks_per_epoch: PositiveInt
    lr_patience: Count
    lr_factor: Annotated[float, Range(1, low_open=True)]
    lr_min: NonNegative
    prefetch_mb: NonNegative
    eval_chunk_mb: NonNegative
    eval_cache_mb: NonNegative
    graph_warmup_steps: Count


@dataclass
class StreamSchema:
    """Ranges of the keys streams share (each stream function's signature gives the key set and types)."""

    num_tasks: PositiveInt
    train_per_task: PositiveInt | None
    classes_per_task: PositiveInt
    val_fraction: Fraction


GROUP_SCHEMAS: dict[str, type] = {"trainer": TrainerSchema, "stream": StreamSchema}


# -- type checking ------------------------------------------------------------------------------------
def _strip(hint: Any) -> tuple[Any, list[Any]]:
    """A hint without ``Annotated``, and the annotations it carried."""
    if typing.get_origin(hint) is Annotated:
        base, *extra = typing.get_args(hint)
        inner, more = _strip(base)
        return inner, [*extra, *more]
    return hint, []


def _type_name(hint: Any) -> str:
    hint, _ = _strip(hint)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(str(arg) for arg in typing.get_args(hint))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        return "a list"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` (plain YAML data) fits ``hint``; None where the hint is not one a config can be
    checked against (a tensor, a model class): such values are left to the code that reads them."""
    hint, _ = _strip(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        verdicts = [_fits(value, arg) for arg in typing.get_args(hint)]
        if any(v is True for v in verdicts):
            return True
        return None if any(v is None for v in verdicts) else False
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        if not isinstance(value, list | tuple):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1:
            verdicts = [_fits(item, args[0]) for item in value]
            return not any(v is False for v in verdicts)
        return True
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    return None


def _check_value(key: str, value: Any, hint: Any, example: Any = None) -> None:
    """Raise a one-line ConfigError when ``value`` does not fit ``hint`` or its range; ``example`` (the
    default, where it fits) shows a value that would."""
    if isinstance(value, dict) and "_target_" in value:
        return  # a nested object: checked by its own target
    if _fits(value, hint) is False:
        shown = "null" if example is None else str(example).lower() if isinstance(example, bool) else example
        fix = f" (e.g. {key}={shown})" if example is not None and _fits(example, hint) else ""
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {value!r}{fix}")
    _, annotations = _strip(hint)
    for bound in annotations:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if isinstance(bound, Range) and number and (math.isnan(value) or not bound.holds(value)):
            raise ConfigError(
                f"{key} must be {bound.describe()}, got {value!r}: set {key} to a value {bound.describe()}"
            )
        if isinstance(bound, NonEmpty) and isinstance(value, str) and not value.strip():
            raise ConfigError(f"{key} is empty: give it a value ({key}=...)")
    # a range on an Optional hint sits on one of its arms
    stripped, _ = _strip(hint)
    if typing.get_origin(stripped) in (Union, types.UnionType) and value is not None:
        for arg in typing.get_args(stripped):
            if typing.get_origin(arg) is Annotated and _fits(value, arg):
                _check_value(key, value, arg)


def nearest(key: str, known: Sequence[str]) -> str:
    """`` (did you mean trainer.epochs?)`` when a known key is close to ``key``, else a pointer to the list."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "`python -m clbench --cfg job` prints every key"


def unknown_key_message(key: str, known: Sequence[str]) -> str:
    """The line for a key no config defines."""
    return f"unknown key {key}: {nearest(key, known)}"


# -- targets --------------------------------------------------------------------------------------------
def locate(target: str, key: str) -> Any:
    """Import ``target`` (``package.module.Name``) or say, in one line, which module failed and where
    Python looked (a user's strategy that is not on the Python path)."""
    module_name = target.rpartition(".")[0]
    if not module_name:
        raise ConfigError(f"{key}._target_ {target!r} is not a dotted path: use package.module.Name")
    parts = target.split(".")
    module = None
    error: BaseException | None = None
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as missing:
            error = missing
            if missing.name and not ".".join(parts[:cut]).startswith(missing.name):
                break  # the module exists but one of its own imports is missing
            continue
        except Exception as broken:  # a user module that raises on import
            raise ConfigError(
                f"{key}._target_: importing {'.'.join(parts[:cut])} failed ({type(broken).__name__}: {broken}); "
                f"fix that module (Python path: {_python_path()})"
            ) from broken
        found: Any = module
        try:
            for name in parts[cut:]:
                found = getattr(found, name)
        except AttributeError:
            raise ConfigError(
                f"{key}._target_: {'.'.join(parts[:cut])} has no {'.'.join(parts[cut:])}: fix {key}._target_"
            ) from None
        return found
    raise ConfigError(
        f"{key}._target_: cannot import module {module_name} ({error}); put its folder on the Python path "
        f"(PYTHONPATH or the current folder; Python path: {_python_path()})"
    )


def _python_path() -> str:
    shown = [p or "." for p in sys.path if "site-packages" not in p and not p.endswith((".zip", "lib-dynload"))]
    return os.pathsep.join(dict.fromkeys(shown))


def _signature_types(target: Any) -> tuple[dict[str, tuple[Any, Any]], bool]:
    """The parameters ``target`` accepts, each with its type hint (``inspect.Parameter.empty`` where a
    hint cannot be evaluated) and default (None where it has none), and whether it takes arbitrary
    keyword arguments."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True
    hints: dict[str, Any] = {}
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except Exception:  # a hint naming a TYPE_CHECKING-only import: evaluate the others one by one
        namespace = getattr(inspect.getmodule(function), "__dict__", {})
        for name, parameter in signature.parameters.items():
            annotation = parameter.annotation
            if isinstance(annotation, str):
                try:
                    annotation = eval(annotation, dict(namespace))
                except Exception:
                    annotation = inspect.Parameter.empty
            hints[name] = annotation
    accepted: dict[str, tuple[Any, Any]] = {}
    var_keyword = False
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            var_keyword = True
        elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
            default = None if parameter.default is inspect.Parameter.empty else parameter.default
            accepted[name] = (hints.get(name, parameter.annotation), default)
    return accepted, var_keyword


def _group_ranges(path: str) -> dict[str, Any]:
    schema = GROUP_SCHEMAS.get(path)
    if schema is None:
        return {}
    return typing.get_type_hints(schema, include_extras=True)


def check_target_node(path: str, node: dict[str, Any]) -> None:
    """Check one ``_target_`` node's keys against its target's signature, and its values against the
    types there and the ranges declared here; recurse into nested nodes."""
    target = locate(str(node["_target_"]), path)
    accepted, var_keyword = _signature_types(target)
    ranges = _group_ranges(path)
    for key, value in node.items():
        full = f"{path}.{key}"
        if key in HYDRA_KEYS:
            continue
        if key not in accepted and not var_keyword:
            known = [f"{path}.{k}" for k in accepted if not k.startswith("_")]
            raise ConfigError(unknown_key_message(full, known))
        hint, default = accepted.get(key, (inspect.Parameter.empty, None))
        _check_value(full, value, hint, default)
        if key in ranges:
            _check_value(full, value, ranges[key])
        _descend(full, value)


def _descend(path: str, value: Any) -> None:
    if isinstance(value, dict):
        if "_target_" in value:
            check_target_node(path, value)
        else:
            for key, item in value.items():
                _descend(f"{path}.{key}", item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _descend(f"{path}[{index}]", item)


def check_results_dir(value: Any) -> Path:
    """``results_dir`` must name a folder that exists or can be made, and that can be written to."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise ConfigError("results_dir is empty: set results_dir=PATH (default: results)")
    folder = Path(str(value)).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"results_dir={value} is a file, not a folder: set results_dir to a folder")
    for parent in folder.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"results_dir={value} lies under the file {parent}: set results_dir to a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(
            f"results_dir={value} cannot be written ({reason}): set results_dir to a writable folder"
        ) from None
    return folder


def check_config(cfg: DictConfig | Mapping[str, Any], extra_top_level: Sequence[str] | None = None) -> None:
    """Check a composed config before anything is built; raise :class:`ConfigError` with one line.

    ``extra_top_level`` names top-level keys defined by the primary config file that this schema does not
    type (so a key added to ``conf/config.yaml`` is accepted before its type is written down here); by
    default those of clbench's own ``conf/config.yaml``."""
    if extra_top_level is None:
        extra_top_level = primary_keys(CONFIG_DIR)
    config = (
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False) if isinstance(cfg, DictConfig) else dict(cfg)
    )
    assert isinstance(config, dict)
    config.pop("hydra", None)
    top = typing.get_type_hints(RunSchema, include_extras=True)
    groups = [key for key, value in config.items() if isinstance(value, dict) and "_target_" in value]
    known = [*top, *groups, *extra_top_level]
    for key, value in config.items():  # top level first: a group may copy a top-level value (``seed``)
        if key in top:
            _check_value(key, value, top[key])
        elif key not in groups and key not in extra_top_level:
            raise ConfigError(unknown_key_message(key, known))
    if "results_dir" in config:
        check_results_dir(config["results_dir"])
    for key in groups:
        check_target_node(key, config[key])


@functools.lru_cache(maxsize=8)
def primary_keys(config_dir: str | Path) -> list[str]:
    """The top-level keys ``config.yaml`` in ``config_dir`` defines (read once per process, no composition)."""
    path = Path(config_dir) / "config.yaml"
    if not path.exists():
        return []
    loaded = yaml.safe_load(path.read_text())
    return [str(k) for k in loaded if k not in ("defaults", "hydra")] if isinstance(loaded, dict) else []


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (``trainer.epochs``), for suggestions."""
    keys: list[str] = []
    items: Callable[[], Any] | None = getattr(node, "items", None)
    if items is None:
        return keys
    for key, value in items():
        full = f"{prefix}{key}"
        if str(key) == "hydra":
            continue
        keys.append(full)
        if isinstance(value, DictConfig | dict):
            keys.extend(flat_keys(value, f"{full}."))
    return keys
