"""Every strategy on a protocol in one command, timed: the comparison sweep a user runs first.

For each protocol this runs, as a subprocess of the real CLI,

    python -m clbench -m protocol=<P> 'strategy=glob(*)' seed=0 trainer.epochs=1 <extra overrides>

and writes one markdown file with the sweep's wall time, the sweep index's counts (completed / skipped / failed)
and one line per job: the strategy, its status, ACC / BWT of a completed run, the reason of a skipped one and
the error of a failed one. The exit code of each sweep is recorded too: it must be 0 (skipped pairs are not
failures).

    python benchmarks/protocol_sweeps.py --protocols default exssnet_splitmnist \\
        --out benchmarks/results/protocol_sweeps.md
    python benchmarks/protocol_sweeps.py --protocols gpm_pfmnist --extra stream.train_per_task=2000 \\
        --out benchmarks/results/protocol_sweeps_gpm_pfmnist.md

Results go to a temporary folder unless ``--results-dir`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUIET = ["logger=none", "plots=false", "trainer.progress=false", "verbose=false"]


def sweep(protocol: str, extra: list[str], results_dir: Path) -> dict:
    """Run one protocol's comparison sweep; return its command, wall time, exit code and index."""
    command = [
        sys.executable,
        "-m",
        "clbench",
        "-m",
        f"protocol={protocol}",
        "strategy=glob(*)",
        "seed=0",
        "trainer.epochs=1",
        *extra,
        f"results_dir={results_dir}",
        *QUIET,
    ]
    tick = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    wall = time.perf_counter() - tick
    indexes = sorted(results_dir.glob("_hydra/sweeps/*/index.json"))
    index = json.loads(indexes[-1].read_text()) if indexes else {"jobs": [], "counts": {}}
    return {"command": command, "wall_s": wall, "returncode": done.returncode, "index": index, "stderr": done.stderr}


def job_line(job: dict) -> str:
    """One table row: strategy, status, ACC / BWT or the reason / error."""
    strategy = next((o.split("=", 1)[1] for o in job.get("overrides", []) if o.startswith("strategy=")), "?")
    status = job.get("status", "?")
    metrics = job.get("metrics") or {}
    if status == "completed":
        bwt = metrics.get("bwt")
        detail = f"ACC {metrics.get('acc', float('nan')):.2f}, BWT {bwt:.2f}" if bwt is not None else ""
    else:
        detail = str(job.get("reason") or job.get("error") or "").replace("|", "/")
    return f"| {strategy} | {status} | {detail} |"


def render(runs: dict[str, dict], extra: list[str]) -> str:
    lines = [
        "# Every strategy on a protocol, one command each",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}. "
        "Made with `benchmarks/protocol_sweeps.py`; other work on the machine inflates a wall time (see below).",
        "",
    ]
    for protocol, run in runs.items():
        shown = " ".join(f"'{a}'" if "(" in a else a for a in run["command"][1:] if not a.startswith("results_dir="))
        counts = ", ".join(f"{n} {s}" for s, n in sorted(run["index"].get("counts", {}).items()))
        lines += [
            f"## {protocol}",
            "",
            f"`python {shown}`",
            "",
            f"Wall time {run['wall_s']:.0f} s; exit code {run['returncode']}; jobs: {counts or 'none'}.",
            "",
            "| strategy | status | result |",
            "|---|---|---|",
            *(job_line(job) for job in run["index"].get("jobs", [])),
            "",
        ]
    if extra:
        lines.append(f"Extra overrides for every sweep: `{' '.join(extra)}`.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", default=["default"])
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every sweep")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default: print)")
    args = parser.parse_args()
    base = args.results_dir or Path(tempfile.mkdtemp(prefix="clbench_protocols_"))
    runs = {p: sweep(p, args.extra, base / p) for p in args.protocols}
    text = render(runs, args.extra)
    if args.out is None:
        print(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    failed = [p for p, run in runs.items() if run["returncode"] != 0]
    if failed:
        for protocol in failed:
            print(
                f"{protocol}: exit code {runs[protocol]['returncode']}\n{runs[protocol]['stderr'][-2000:]}",
                file=sys.stderr,
            )
        sys.exit(1)


if __name__ == "__main__":
    main()
