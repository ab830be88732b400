"""The self-describing result file (``result.json``) and where runs find each other's results.

Layout: ``<results_dir>/<stream>/<strategy>/<run id>/`` holds ``result.json``, ``acc_matrix.png`` and
``checkpoint.pt``. Every write goes to a temporary file that is then renamed, so a crash never leaves a
truncated file behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

SCHEMA = "clbench.result/1"
VERSIONED_PACKAGES = ("clbench", "torch", "torchvision", "numpy", "hydra-core", "avalanche-lib", "wandb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def package_versions() -> dict[str, str]:
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


PATH_KEYS = ("root", "download", "dataset_root")


def without_paths(node: Any) -> Any:
    """A config node without where-the-data-lives keys, at any depth (they do not change results)."""
    if isinstance(node, dict):
        return {k: without_paths(v) for k, v in node.items() if k not in PATH_KEYS}
    if isinstance(node, list):
        return [without_paths(v) for v in node]
    return node


def find_reference_run(
    results_dir: Path, stream: str, seed: int, stream_config: dict[str, Any]
) -> dict[str, Any] | None:
    """The single-task-expert reference: a completed ``independent`` run on the same stream (same resolved
    stream config, data paths aside) and seed, or None when there is none. Never estimated.

    Its diagonal gives a*_j for intransigence and its training-accuracy curves the L2M expert curves.
    """
    for path in sorted((results_dir / stream / "independent").glob("*/result.json")):
        try:
            other = read_result(path)
        except (OSError, json.JSONDecodeError):
            continue
        other_stream = without_paths(json_ready(other.get("config", {}).get("stream")))
        same_stream = other_stream == without_paths(json_ready(stream_config))
        if other.get("status") == "completed" and other.get("seed") == seed and same_stream:
            return other
    return None
