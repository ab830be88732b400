"""A user's own strategy plugs in with a class on the Python path and one YAML, editing nothing here."""

import json
import os
import subprocess
import sys
import textwrap


def test_user_strategy_from_readme_runs(tmp_path):
    package = tmp_path / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "l2.py").write_text(
        textwrap.dedent(
            """
            from clbench.strategy import Strategy

            class L2ToPrevious(Strategy):
                name = "l2_prev"
                scenarios = ("task", "domain", "class")

                def __init__(self, strength: float = 1.0):
                    super().__init__()
                    self.strength, self.anchor = strength, None

                def loss(self, output, y, batch, task):
                    loss = super().loss(output, y, batch, task)
                    if self.anchor is not None:
                        pairs = zip(self.model.parameters(), self.anchor)
                        loss = loss + self.strength * sum(((p - a) ** 2).sum() for p, a in pairs)
                    return loss

                def after_task(self, task):
                    self.anchor = [p.detach().clone() for p in self.model.parameters()]
            """
        )
    )
    conf = tmp_path / "conf" / "strategy"
    conf.mkdir(parents=True)
    (conf / "l2_prev.yaml").write_text("_target_: my_package.l2.L2ToPrevious\nstrength: 1.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clbench",
            "--config-dir",
            str(tmp_path / "conf"),
            "strategy=l2_prev",
            "stream=split_digits",
            "logger=none",
            "trainer.progress=false",
            f"results_dir={tmp_path / 'results'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(next((tmp_path / "results").glob("split_digits/l2_prev/*/result.json")).read_text())
    assert result["status"] == "completed" and result["config"]["strategy"]["strength"] == 1.0
