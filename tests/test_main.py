"""clbench.__main__: clbench's own --help / --version, the user's config folders, Hydra's errors as one line."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import clbench.__main__ as cli


def _clbench(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "clbench", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def _main_in_process(args: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """``python -m clbench <args>`` for the answers main() gives before Hydra starts (no new interpreter): its
    stdout. The other tests here start the real entry point."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["clbench", *args])
    cli.main()
    return capsys.readouterr().out


def test_help_is_clbenchs_own_usage(tmp_path, monkeypatch, capsys):
    stdout = _main_in_process(["--help"], tmp_path, monkeypatch, capsys)
    for expected in ("usage: python -m clbench", "strategy ", "finetune", "stream ", "permuted_mnist5k", "model "):
        assert expected in stdout
    for expected in ("trainer.epochs=N", "python -m clbench.report", "python -m clbench.check", "--hydra-help"):
        assert expected in stdout
    assert "Powered by Hydra" not in stdout
    assert list(tmp_path.iterdir()) == []  # answering --help runs and writes nothing


def test_version(tmp_path, monkeypatch, capsys):
    stdout = _main_in_process(["--version"], tmp_path, monkeypatch, capsys)
    assert stdout.strip() == f"clbench {metadata.version('clbench')}"


def _user_strategy(folder: Path, name: str = "mine") -> None:
    (folder / "strategy").mkdir(parents=True)
    (folder / "strategy" / f"{name}.yaml").write_text("_target_: strategies.finetune.Finetune\n")


def test_user_config_folders_are_searched(tmp_path, monkeypatch):
    """./conf of the current folder, CLBENCH_CONFIG_PATH and a package's clbench.configs entry point."""
    local, listed, packaged = tmp_path / "cwd", tmp_path / "listed", tmp_path / "site" / "my_configs"
    _user_strategy(local / "conf", "local")
    _user_strategy(listed, "listed")
    _user_strategy(packaged, "packaged")
    (packaged / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CLBENCH_CONFIG_PATH", str(listed))
    entry = metadata.EntryPoint(name="my_configs", value="my_configs", group=cli.ENTRY_POINT_GROUP)
    monkeypatch.setattr(cli.metadata, "entry_points", lambda group: [entry] if group == cli.ENTRY_POINT_GROUP else [])
    dirs = cli.user_config_dirs(local)
    assert dirs == [(local / "conf").resolve(), listed.resolve(), packaged.resolve()]
    monkeypatch.chdir(local)
    for name in ("local", "listed", "packaged"):
        assert cli.check_group_choices([f"strategy={name}"]) is None
    assert "unknown strategy 'nope'" in cli.check_group_choices(["strategy=nope"])
    argv = cli.with_user_search_path(["strategy=local"], dirs)
    assert argv[-1] == "hydra.searchpath=[" + ",".join(f"file://{d}" for d in dirs) + "]"
    assert cli.with_user_search_path(["hydra.searchpath=[pkg://x]"], dirs) == ["hydra.searchpath=[pkg://x]"]


def test_clbench_config_path_runs_a_strategy_without_config_dir(tmp_path):
    listed = tmp_path / "listed"
    _user_strategy(listed, "mine")
    done = _clbench(
        ["strategy=mine", "stream=split_digits", "logger=none", "trainer.epochs=1", f"results_dir={tmp_path}"],
        tmp_path,
        {"CLBENCH_CONFIG_PATH": str(listed)},
    )
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.glob("split_digits/finetune/*/result.json"))


def test_a_user_module_that_does_not_import_is_one_line(tmp_path):
    (tmp_path / "conf" / "strategy").mkdir(parents=True)
    (tmp_path / "conf" / "strategy" / "l2_prev.yaml").write_text("_target_: my_package.l2.L2ToPrevious\n")
    done = _clbench(["strategy=l2_prev", "logger=none", f"results_dir={tmp_path / 'r'}"], tmp_path)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot import module my_package.l2" in lines[0] and "Python path:" in lines[0]


def test_composition_errors_become_one_line_with_the_nearest_key(compose_cfg):
    with pytest.raises(Exception) as caught:
        compose_cfg(["trainer.epoch=1"])
    assert cli.composition_error_line(caught.value) == "unknown key trainer.epoch: did you mean trainer.epochs?"
    with pytest.raises(Exception) as caught:
        compose_cfg(["trainer.epochs=[1"])
    line = cli.composition_error_line(caught.value)
    assert line and "\n" not in line


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    from clbench.runner import RunInterrupted

    def interrupted() -> None:
        raise RunInterrupted(3)

    monkeypatch.setattr(sys, "argv", ["clbench"])
    monkeypatch.setattr(cli, "_hydra_main", interrupted)
    with pytest.raises(SystemExit) as exit_code:
        cli.main()
    assert exit_code.value.code == 130
    assert capsys.readouterr().err == "clbench: interrupted during task 3; rerun the same command to resume\n"
