"""``python -m clbench``: one run; ``python -m clbench -m key=a,b ...``: a Hydra multirun sweep."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Compose the config, run it, and return ACC (what a Hydra sweeper optimises)."""
    from clbench.runner import run

    result = run(cfg)
    return result.get("metrics", {}).get("acc")


if __name__ == "__main__":
    main()
