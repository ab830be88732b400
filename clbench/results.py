"""The self-describing result file (``result.json``) and where runs find each other's results.

Layout: ``<results_dir>/<stream>/<strategy>/<run id>/`` holds ``result.json``, ``acc_matrix.png`` and
``checkpoint.pt``. Every write goes to a temporary file that is then renamed, so a crash never leaves a
truncated file behind.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import platform
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA = "clbench.result/1"
VERSIONED_PACKAGES = ("clbench", "torch", "torchvision", "numpy", "hydra-core", "avalanche-lib", "wandb")


class CorruptRunFileError(ValueError):
    """A run folder's result.json or checkpoint.pt cannot be read back; the message names the file."""


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    ``mkstemp`` makes its file 0600 whatever the umask; the file gets the mode a plain ``open`` would have
    given it (0666 less the umask), so a group that shares a results folder can read every run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` with the same temporary-file-and-rename guarantee."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def json_ready(value: Any) -> Any:
    """Numbers, arrays and tensors as plain JSON; NaN and inf become null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if isinstance(value, torch.Tensor | np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(path: Path, result: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(json_ready(result), indent=2, sort_keys=False) + "\n").encode())


def read_result(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _corrupt(path: Path, error: BaseException) -> CorruptRunFileError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return CorruptRunFileError(
        f"{path} cannot be read ({type(error).__name__}: {reason}): pass resume=false to start this run afresh"
    )


def read_run_result(path: Path) -> dict[str, Any]:
    """A run's own result.json, for resuming it; a damaged file is one line naming it and ``resume=false``."""
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _corrupt(path, error) from None
    if not isinstance(result, dict):
        raise _corrupt(path, TypeError(f"holds a {type(result).__name__}, not a result"))
    return result


def load_checkpoint(path: Path, device: torch.device | str) -> dict[str, Any]:
    """A run's checkpoint.pt, for resuming it; a damaged file is one line naming it and ``resume=false``."""
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise _corrupt(path, error) from None
    if not isinstance(checkpoint, dict) or "next_task" not in checkpoint:
        raise _corrupt(path, TypeError("not a clbench checkpoint"))
    return checkpoint


def package_versions() -> dict[str, str]:
    """The versions of the packages a result depends on, as this process loaded them (read once per process:
    a package upgraded on disk mid-sweep is not the code this process runs)."""
    return dict(_package_versions())


@functools.cache
def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def config_digest(config: dict[str, Any]) -> str:
    """A short stable hash of a resolved config: the same experiment gets the same run id."""
    return hashlib.sha256(json.dumps(json_ready(config), sort_keys=True).encode()).hexdigest()[:8]


PATH_KEYS = ("root", "download", "dataset_root", "cache_dir")


def without_paths(node: Any) -> Any:
    """A config node without where-the-data-lives (or where-the-weights-live) keys and download switches, at any
    depth: they do not change results, and moving a data or weights folder must not change a run's id."""
    if isinstance(node, dict):
        return {k: without_paths(v) for k, v in node.items() if k not in PATH_KEYS}
    if isinstance(node, list):
        return [without_paths(v) for v in node]
    return node


RESULT_NEUTRAL_TRAINER_KEYS = (
    "progress",
    "eval_batch_size",
    "eval_chunk_mb",
    "batched_eval",
    "prefetch_mb",
    "eval_cache_mb",
    "cuda_graphs",
    "closed_form",
    "block_threads",
    "graph_warmup_steps",
)
"""Trainer speed switches that leave R unchanged (bit for bit, or up to float rounding as a change of device
would): not part of a run's identity."""


MODEL_KEYS_OFF = {"checkpoint": None, "freeze": []}
"""Model keys added after results were recorded, at the value that leaves the model as it was before they
existed (nothing loaded, nothing frozen): left out of the identity at that value, so a run keeps its run id
and its report group (a fine-tune run made before them is still the baseline of one made after)."""


PRETRAIN_FOLDER, PRETRAIN_CHECKPOINT = "_pretrained", "checkpoint.pt"
"""The pretraining cache's file is <results_dir>/_pretrained/<hash>/checkpoint.pt (written by clbench.pretrain)."""


def pretrain_cache_identity(checkpoint: str) -> str:
    """``pretrain:<hash>`` for a checkpoint in the pretraining cache, whichever results_dir holds it (the hash is
    the recipe's and the architecture's); any other path as given. Without this, the same run under another
    results_dir got another run id and another report group."""
    path = Path(checkpoint)
    if len(path.parts) >= 3 and (path.parts[-3], path.name) == (PRETRAIN_FOLDER, PRETRAIN_CHECKPOINT):
        return f"pretrain:{path.parts[-2]}"
    return checkpoint


RECENTLY_WRITTEN_S = 2.0
"""A file modified less than this long ago is hashed afresh every time, never from the cache: file times tick in
steps (a few ms on Linux, up to 2 s on FAT and some network filesystems), so weights saved twice within one step
into the same file can leave size, times and inode as they were (as git treats a "racily clean" file)."""


def _sha256(path: Path) -> str:
    """The sha256 of ``path``'s bytes, read in chunks (never the whole file in memory)."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


@functools.cache
def _cached_sha256(path: Path, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    """:func:`_sha256`, cached by the file's size, times and inode as well as its path: a file saved again under
    the same name is hashed again, and one that stays as it is is read once per process however many runs or
    results (a report over a sweep) name it."""
    return _sha256(path)


def checkpoint_identity(checkpoint: str) -> str:
    """What ``model.checkpoint`` loads, for a run's identity: ``pretrain:<hash>`` for the pretraining cache (its
    folder is already named by the hash of what made it: :func:`pretrain_cache_identity`), otherwise
    ``sha256:<hex>`` of the file's bytes. A path alone let a rerun after new weights were saved into the same
    file reuse the old weights' result; the same bytes under another path are the same experiment.

    A file that cannot be read gets ``unreadable:<path>``, an identity no completed run has, so the runner goes on
    to build the model, whose loader stops with its one-line error (and a report over results whose file has since
    gone still reads them)."""
    pretrained = pretrain_cache_identity(checkpoint)
    if pretrained != checkpoint:
        return pretrained
    path = Path(checkpoint).expanduser()
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return f"unreadable:{checkpoint}"
        if time.time_ns() - info.st_mtime_ns < RECENTLY_WRITTEN_S * 1e9:
            digest = _sha256(path)
        else:
            digest = _cached_sha256(path.resolve(), info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
    except OSError:
        return f"unreadable:{checkpoint}"
    return f"sha256:{digest}"


CHECKPOINT_IDENTITY_KEY = "model_checkpoint_identity"
"""result.json's record of what ``model.checkpoint`` held when the run ran (:func:`checkpoint_identity`; null
without a checkpoint): the report groups by it, since the file may hold other weights by the time it reads it."""


def recorded_checkpoint_identity(result: dict[str, Any]) -> str | None:
    """What a result's ``model.checkpoint`` held when it ran, as its runner recorded it (never read from the file,
    which may have been saved again or removed since); None for a result written before clbench recorded it."""
    recorded = result.get(CHECKPOINT_IDENTITY_KEY)
    return recorded if isinstance(recorded, str) else None


def experiment_identity(config: dict[str, Any], identify: Callable[[str], str] = checkpoint_identity) -> dict[str, Any]:
    """The parts of a resolved config that change results (not paths, loggers, progress bars or speed-only
    switches): the run id hashes it, and the report groups runs by it (all of it but the seed). A user's
    ``model.checkpoint`` enters by its content (:func:`checkpoint_identity`); the model's weights folder and
    download switch (``cache_dir``, ``download``) are left out as the stream's data paths are.

    ``identify`` maps the checkpoint's path to what enters: the report passes the identity a result recorded,
    so reading results never hashes a file that may have changed since they ran."""
    stream = without_paths(config.get("stream", {}))
    trainer = {k: v for k, v in (config.get("trainer") or {}).items() if k not in RESULT_NEUTRAL_TRAINER_KEYS}
    keys = ("strategy", "seed", "deterministic")
    model = config.get("model")
    if isinstance(model, dict):
        model = without_paths({k: v for k, v in model.items() if k not in MODEL_KEYS_OFF or v != MODEL_KEYS_OFF[k]})
        if isinstance(model.get("checkpoint"), str):
            model["checkpoint"] = identify(model["checkpoint"])
    return {"stream": stream, "trainer": trainer, "model": model, **{k: config.get(k) for k in keys}}


def git_state(folder: Path) -> dict[str, Any]:
    """The git commit of the checkout holding ``folder`` and whether tracked files differ from it (untracked
    files are ignored: results and scratch files live in the tree). Empty outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": bool(status.strip())}


def _source_files(cls: type) -> dict[str, Path]:
    """The files a strategy's behaviour is written in, by their path from the import root
    (``strategies/ewc.py``): the file of every class in its MRO (the base class and any user module included)
    and, where such a file sits in a sub-package (``strategies/gradient_projection/``), its sibling modules,
    which hold the helpers it imports."""
    files: dict[str, Path] = {}
    for klass in cls.__mro__:
        if klass is object:
            continue
        try:
            source = inspect.getsourcefile(klass)
        except TypeError:  # a built-in class
            continue
        if source is None:
            continue
        path = Path(source).resolve()
        depth = klass.__module__.count(".")
        root = path.parents[depth] if path.name != "__init__.py" else path.parents[depth + 1]
        siblings = path.parent.glob("*.py") if depth >= 2 else [path]
        files.update({p.resolve().relative_to(root).as_posix(): p.resolve() for p in siblings})
    return dict(sorted(files.items()))


def source_digest(cls: type) -> dict[str, Any]:
    """A hash of the source of strategy class ``cls`` (:func:`_source_files`): ``digest`` over every file's
    name and bytes, and ``files`` with each file's own hash, so a changed result can be traced to a file."""
    files = {}
    for name, path in _source_files(cls).items():
        try:
            files[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        except OSError:
            continue
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "digest": digest, "files": files}


class Provenance:
    """What made a result: clbench's version, the git commit (and dirty flag) of the clbench checkout and of the
    checkout holding the strategy's module where that is another one, and the strategy's source hash.

    The source hash is taken at once (the runner compares it with a completed result's before deciding to rerun);
    the git calls (~0.1 s, a tenth of a short run) run in a background thread while the run loads its data and
    model, and :meth:`record` waits for them."""

    def __init__(self, strategy_class: type) -> None:
        from clbench import __version__

        self.version = __version__
        self.strategy_source = source_digest(strategy_class)
        strategy_file = inspect.getsourcefile(strategy_class)
        package = Path(__file__).resolve().parent
        folders = [package]
        if strategy_file is not None and not Path(strategy_file).resolve().is_relative_to(package.parent):
            folders.append(Path(strategy_file).resolve().parent)  # a user module in another checkout
        self._git: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=lambda: self._git.extend(git_state(f) for f in folders), daemon=True)
        self._thread.start()

    def record(self) -> dict[str, Any]:
        """The ``provenance`` block of result.json."""
        self._thread.join(timeout=30)
        own = self._git[0] if self._git else {}
        record: dict[str, Any] = {"clbench_version": self.version, "git": own}
        if len(self._git) > 1 and self._git[1] and self._git[1] != own:
            record["strategy_git"] = self._git[1]
        record["strategy_source"] = self.strategy_source
        return record


def provenance(strategy_class: type) -> dict[str, Any]:
    """:meth:`Provenance.record` of ``strategy_class``, waited for."""
    return Provenance(strategy_class).record()


def recorded_source_digest(result: dict[str, Any]) -> str | None:
    """The strategy source hash a result file recorded, or None for results written before clbench recorded it."""
    return ((result.get("provenance") or {}).get("strategy_source") or {}).get("digest")


def find_reference_run(
    results_dir: Path,
    stream: str,
    seed: int,
    stream_config: dict[str, Any],
    model_config: dict[str, Any] | None,
    strategy: str = "independent",
) -> dict[str, Any] | None:
    """A reference run: a completed ``strategy`` run on the same stream (same resolved stream config, data
    paths aside), the same model (``model_config``, paths aside) and seed, or None when there is none. Never
    estimated.

    ``independent`` (single-task experts): its diagonal gives the single-task a*_j and its training-accuracy
    curves the L2M expert curves. ``joint``: its diagonal gives intransigence's a*_k (Chaudhry et al. 2018).
    The model must match as ``clbench.report`` matches it: a reference on another network (SupSup's MLP has no
    biases, joint's has) would measure the architecture, and a run's figure would depend on which runs happened
    to finish before it, since the report, which reads runs in any order, gives it none.
    """
    wanted = [without_paths(json_ready(node)) for node in (stream_config, model_config)]
    for path in sorted((results_dir / stream / strategy).glob("*/result.json")):
        try:
            other = read_result(path)
        except (OSError, json.JSONDecodeError):
            continue
        config = other.get("config", {})
        same = [without_paths(json_ready(config.get(key))) for key in ("stream", "model")] == wanted
        if other.get("status") == "completed" and other.get("seed") == seed and same:
            return other
    return None
