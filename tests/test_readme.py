"""The README's tables name every strategy and protocol that conf/ ships (a new one must reach the front page)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHIPPED = [
    (group, path.stem) for group in ("strategy", "protocol") for path in sorted((ROOT / "conf" / group).glob("*.yaml"))
]


@pytest.mark.parametrize(("group", "name"), SHIPPED, ids=[f"{g}={n}" for g, n in SHIPPED])
def test_the_readme_names_every_shipped_strategy_and_protocol(group, name):
    assert f"`{name}`" in README, f"README.md's {group} table has no row naming `{name}`"


def test_the_readme_stays_a_front_page():
    assert len(README.splitlines()) < 150  # issue 27: details live in docs/
