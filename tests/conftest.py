"""Shared test helpers: compose the exact config a user gets, with tiny settings, and run it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from clbench.__main__ import CONFIG_DIR

# One intra-op thread for the in-process runs (the subprocesses get OMP_NUM_THREADS=1): the tests' models are tiny,
# and on a shared 2-core machine two OpenMP threads spin against the other load; a 45 s stretch of this suite took
# 6 min with two. Tests of thread settings set their own count first.
torch.set_num_threads(1)

# Settings that keep an end-to-end run to a second or two on 2 CPU cores.
TINY = [
    "logger=none",
    "device=cpu",
    "verbose=false",
    "trainer.progress=false",
    "trainer.epochs=1",
]


def compose_config(overrides: list[str], results_dir: Path | str) -> DictConfig:
    """The config `python -m clbench <overrides>` would run, with results under ``results_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, f"results_dir={results_dir}"])


def run_config(overrides: list[str], results_dir: Path | str, tiny: bool = True) -> dict[str, Any]:
    """Compose and run one experiment in-process; returns its result dict."""
    from clbench.runner import run

    return run(compose_config([*(TINY if tiny else []), *overrides], results_dir))


@pytest.fixture
def run_tiny(tmp_path):
    """``run_tiny(["strategy=joint", ...])`` runs a tiny experiment with results in a temp folder."""

    def _run(overrides: list[str], results_dir: Path | None = None, tiny: bool = True) -> dict[str, Any]:
        return run_config(overrides, results_dir or tmp_path / "results", tiny)

    return _run


@pytest.fixture
def compose_cfg():
    """``compose_cfg(["experiment=gpm_pfmnist"])``: the composed config, without running it."""

    def _compose(overrides: list[str], results_dir: Path | str = "results") -> DictConfig:
        return compose_config(overrides, results_dir)

    return _compose


def error_line_in_process(overrides: list[str], results_dir: Path | str) -> str:
    """The line ``python -m clbench <overrides>`` prints for a bad input, found in main()'s order without a new
    interpreter (about 4 s of start-up less): group names, results_dir, Hydra's composition, then the run, whose
    error must be one main() reports as a user error (exit code 2, no traceback). One subprocess test per path
    (tests/test_reliability.py, THROUGH_CLI) keeps main() itself checked."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    import clbench.__main__ as cli
    from clbench.runner import run
    from clbench.schema import check_results_dir

    cli.register_resolvers()
    line = cli.check_group_choices(overrides)
    if line is None:
        check_results_dir(str(results_dir))
        try:
            cfg = compose_config([*overrides, "logger=none", "trainer.progress=false", "verbose=false"], results_dir)
        except (HydraException, OmegaConfBaseException) as error:
            line = cli.composition_error_line(error)
    if line is None:
        with pytest.raises(Exception) as caught:
            run(cfg)
        cause = cli._root_cause(caught.value)
        assert cli._is_user_error(cause), f"main() would print a traceback and exit 1: {cause!r}"
        line = str(cause)
    assert "\n" not in line.strip(), line
    return line


@pytest.fixture
def cli_error_line():
    """``cli_error_line(["trainer.lr=-0.1"], tmp_path)``: :func:`error_line_in_process`."""
    return error_line_in_process


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(starts_with: str) -> str:
    """The README code block whose first line is ``starts_with``, verbatim (tests run what the README shows)."""
    blocks = README.read_text().split("```")
    for block in blocks[1::2]:
        body = block.split("\n", 1)[1]
        if body.startswith(starts_with):
            return body
    raise AssertionError(f"README has no code block starting with {starts_with!r}")


@pytest.fixture
def readme_strategy(tmp_path) -> Path:
    """A folder holding the README's own strategy example as a user writes it: ``my_package/l2.py`` and
    ``conf/strategy/l2_prev.yaml``, both copied from the README. Run clbench with this folder as the current
    one (``./conf`` is found without ``--config-dir``, ``my_package`` on the Python path)."""
    folder = tmp_path / "user"
    (folder / "my_package").mkdir(parents=True)
    (folder / "my_package" / "__init__.py").write_text("")
    (folder / "my_package" / "l2.py").write_text(readme_block("# my_package/l2.py"))
    (folder / "conf" / "strategy").mkdir(parents=True)
    (folder / "conf" / "strategy" / "l2_prev.yaml").write_text(readme_block("# conf/strategy/l2_prev.yaml"))
    return folder


@pytest.fixture
def interrupt_after_first_checkpoint(monkeypatch):
    """``with interrupt_after_first_checkpoint(): run_tiny(...)``: Ctrl-C right after task 0's checkpoint is on
    disk (deterministic, unlike a timed signal); the run raises RunInterrupted, and the patch ends with the block."""
    import contextlib

    from clbench import runner

    save = runner.atomic_torch_save

    def save_then_interrupt(obj, path):
        save(obj, path)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def interrupting():
        with monkeypatch.context() as patch:
            patch.setattr(runner, "atomic_torch_save", save_then_interrupt)
            yield

    return interrupting
