"""clbench against GPM's official PMNIST script, side by side, on permuted Fashion-MNIST.

GPM's ``main_pmnist.py`` (github.com/sahagobinda/GPM) is run unmodified from a checkout you provide;
nothing of it is copied here. Its data module (``dataloader/pmnist.py``) downloads MNIST, which this
machine cannot, so this script stands in a module of the same interface that serves the full
Fashion-MNIST (60k/10k, 10% of train held out as GPM does) with one pixel permutation per task, all
tasks permuted and normalised by the training set's mean and std, as clbench's ``permuted_fashion_mnist``
stream. Both sides then run GPM's protocol: 10 tasks, MLP 784-100-100-10 without biases, SGD lr 0.01 no
momentum, batch 10, 5 epochs, thresholds [0.95, 0.99, 0.99], 300 samples per representation matrix
(clbench: ``experiment=gpm_pfmnist``).

Each side is one whole process (imports, data loading, training, evaluation), timed from outside,
one after the other on the same machine with the same thread settings:

    git clone https://github.com/sahagobinda/GPM /tmp/GPM        # once, on a machine with internet
    pip install seaborn                                          # the official script imports it
    python benchmarks/gpm_official_speed.py --gpm-repo /tmp/GPM --seeds 0

The official script itself evaluates the whole training and validation sets after every epoch (that is
its protocol, and counted); clbench evaluates the validation loss only when an lr schedule asks for it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import runpy
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
NUM_TASKS = 10


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def permuted_fashion_mnist(seed: int = 0, fixed_order: bool = False, pc_valid: float = 0.1):
    """The official loader's return value ``(data, taskcla, size)`` for permuted Fashion-MNIST."""
    import torch

    folder = Path(os.environ.get("FASHION_MNIST_DIR", FASHION))
    x_train = _idx(folder / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y_train = _idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    x_test = _idx(folder / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y_test = _idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    mean, std = x_train.mean(), x_train.std()
    x_train = ((x_train - mean) / std).reshape(len(x_train), -1)
    x_test = ((x_test - mean) / std).reshape(len(x_test), -1)
    rng = np.random.RandomState(seed)
    nvalid = int(pc_valid * len(x_train))
    data: dict = {}
    for t in range(NUM_TASKS):
        perm = rng.permutation(x_train.shape[1])
        train = torch.from_numpy(np.ascontiguousarray(x_train[:, perm])).view(-1, 1, 28, 28)
        test = torch.from_numpy(np.ascontiguousarray(x_test[:, perm])).view(-1, 1, 28, 28)
        labels = torch.from_numpy(y_train)
        data[t] = {
            "name": f"pfmnist-{t}",
            "ncla": 10,
            "train": {"x": train[nvalid:].clone(), "y": labels[nvalid:].clone()},
            "valid": {"x": train[:nvalid].clone(), "y": labels[:nvalid].clone()},
            "test": {"x": test, "y": torch.from_numpy(y_test)},
        }
    if torch.cuda.is_available():
        # The script (written for torch 1.x) indexes the data with a CUDA index tensor (x[b], b on cuda:0),
        # which current torch refuses for CPU tensors, so on a GPU machine the data is served on the GPU;
        # the script's own .to(device) calls then cost nothing, which only makes the official side faster.
        for t in range(NUM_TASKS):
            for split in ("train", "valid", "test"):
                data[t][split] = {k: v.cuda() for k, v in data[t][split].items()}
    taskcla = [(t, 10) for t in range(NUM_TASKS)]
    data["ncla"] = 10 * NUM_TASKS
    return data, taskcla, [1, 28, 28]


def run_official_child(repo: Path, seed: int, epochs: int) -> None:
    """In this process: serve the stand-in data module, then run the official script as ``__main__``."""
    package = types.ModuleType("dataloader")
    package.__path__ = []
    module = types.ModuleType("dataloader.pmnist")
    module.get = permuted_fashion_mnist
    package.pmnist = module
    sys.modules["dataloader"], sys.modules["dataloader.pmnist"] = package, module
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.argv = ["main_pmnist.py", "--seed", str(seed), "--n_epochs", str(epochs)]
    os.chdir(repo)
    runpy.run_path(str(repo / "main_pmnist.py"), run_name="__main__")


def timed(command: list[str], log: Path) -> tuple[float, str, int]:
    tick = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - tick, log.read_text(), code


def parse_official(text: str) -> tuple[float, float]:
    acc = re.search(r"Final Avg Accuracy:\s*([-\d.]+)%", text)
    bwt = re.search(r"Backward transfer:\s*([-\d.]+)%", text)
    if acc is None or bwt is None:
        raise RuntimeError("the official script did not print its final accuracy; see its log")
    return float(acc.group(1)), float(bwt.group(1))


def parse_clbench(text: str) -> tuple[float, float]:
    found = re.search(r"ACC ([-\d.]+)% \| BWT ([-\d.]+)%", text)
    if found is None:
        raise RuntimeError("clbench did not print its summary; see its log")
    return float(found.group(1)), float(found.group(2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpm-repo", type=Path, default=Path(os.environ.get("GPM_REPO", "/tmp/GPM")))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/clbench_gpm_official"))
    parser.add_argument("--table", type=Path, default=ROOT / "benchmarks" / "results" / "gpm_official_speed.md")
    parser.add_argument("--official-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("both", "clbench", "official"), default="both")
    parser.add_argument(
        "--device", default="cpu", help="clbench's device (cpu | cuda); the official script takes cuda:0 when it exists"
    )
    parser.add_argument("overrides", nargs="*", help="extra clbench overrides, e.g. trainer.cuda_graphs=true")
    args = parser.parse_args()
    if args.official_child:
        run_official_child(args.gpm_repo.resolve(), args.seeds[0], args.epochs)
        return 0
    if args.only != "clbench" and not (args.gpm_repo / "main_pmnist.py").exists():
        print(
            f"no main_pmnist.py under {args.gpm_repo}: `git clone https://github.com/sahagobinda/GPM` there "
            "or pass --gpm-repo",
            file=sys.stderr,
        )
        return 2
    args.log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        row: dict[str, float | int] = {"seed": seed}
        if args.only in ("both", "clbench"):
            command = [
                sys.executable,
                "-m",
                "clbench",
                "experiment=gpm_pfmnist",
                f"seed={seed}",
                "logger=none",
                "trainer.progress=false",
                f"device={args.device}",
                f"trainer.epochs={args.epochs}",
                f"results_dir={args.log_dir / 'results'}",
                "resume=false",
                *args.overrides,
            ]
            seconds, text, code = timed(command, args.log_dir / f"clbench_seed{seed}.log")
            if code != 0:
                raise RuntimeError(f"clbench failed (exit {code}); see {args.log_dir}")
            row["clbench_s"], (row["clbench_acc"], row["clbench_bwt"]) = seconds, parse_clbench(text)
            print(f"seed {seed} clbench: {seconds:.1f} s, ACC {row['clbench_acc']} BWT {row['clbench_bwt']}")
        if args.only in ("both", "official"):
            command = [
                sys.executable,
                __file__,
                "--official-child",
                "--gpm-repo",
                str(args.gpm_repo),
                "--seeds",
                str(seed),
                "--epochs",
                str(args.epochs),
            ]
            seconds, text, code = timed(command, args.log_dir / f"official_seed{seed}.log")
            if code != 0:
                raise RuntimeError(f"the official script failed (exit {code}); see {args.log_dir}")
            row["official_s"], (row["official_acc"], row["official_bwt"]) = seconds, parse_official(text)
            print(f"seed {seed} official: {seconds:.1f} s, ACC {row['official_acc']} BWT {row['official_bwt']}")
        rows.append(row)
    if args.only == "both":
        write_table(rows, args)
    return 0


def write_table(rows: list[dict], args: argparse.Namespace) -> None:
    import platform

    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    official_device = "the GPU (cuda:0)" if torch.cuda.is_available() else "the CPU"
    lines = [
        "# clbench vs GPM's official main_pmnist.py (permuted Fashion-MNIST, GPM protocol)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__}, {gpu}. clbench on `device={args.device}`, the official script on {official_device}. "
        f"Epochs per task: {args.epochs}. The official script runs with torch's default "
        f"{torch.get_num_threads()} threads; clbench's preset `experiment=gpm_pfmnist` sets `cpu_threads=1` (its "
        "batch-10 steps run faster on one thread).",
        f"Command: `python benchmarks/gpm_official_speed.py --gpm-repo <GPM checkout> --seeds "
        f"{' '.join(str(r['seed']) for r in rows)} --epochs {args.epochs} --device {args.device}"
        f"{''.join(' ' + o for o in args.overrides)}`",
        "",
        "| seed | clbench s | official s | speed-up | clbench ACC / BWT | official ACC / BWT |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['clbench_s']:.1f} | {r['official_s']:.1f} | {r['official_s'] / r['clbench_s']:.2f}x | "
            f"{r['clbench_acc']:.2f} / {r['clbench_bwt']:.2f} | {r['official_acc']:.2f} / {r['official_bwt']:.2f} |"
        )
    args.table.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
