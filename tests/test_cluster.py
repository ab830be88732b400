"""Scale-out for real: a 2x2 sweep on a local Ray cluster and through submitit's local executor, the sbatch
script the SLURM preset would submit, and two processes writing into one results tree at once.

The Ray cluster is a real ``ray start --head`` (2 CPUs, 2 GPU slots that Ray only schedules, so ``num_gpus``
is exercised without a GPU), listening on 127.0.0.1 only, and stopped afterwards whatever happens.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TINY = [
    "stream=split_digits",
    "trainer.epochs=1",
    "logger=none",
    "plots=false",
    "trainer.progress=false",
    "verbose=false",
    "device=cpu",
    "cpu_threads=1",
]
GRID = ["strategy=finetune,joint", "seed=0,1"]
# Ray on Linux advertises the machine's outward address and binds every interface; in its single-machine mode
# (the one it uses on macOS and Windows) every process advertises and binds 127.0.0.1.
LOCAL_RAY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
CLUSTER_CPUS, CLUSTER_GPUS = 2, 2


def clbench(*args: str, cwd: Path, module: str = "clbench", env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m <module> <args>`` (one CPU thread), its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    """Wait for a started command: its exit code, stdout and stderr (killed if it overruns)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
    return process.returncode, out, err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def result_files(results: Path) -> dict[tuple[str, str], Path]:
    """``(strategy, seed) -> result.json`` for the tiny stream's runs."""
    found = {}
    for path in results.glob("split_digits/*/*/result.json"):
        found[(path.parent.parent.name, str(json.loads(path.read_text())["config"]["seed"]))] = path
    return found


def newest_index(results: Path) -> dict:
    indexes = sorted(results.glob("_hydra/sweeps/*/index.json"))
    assert indexes, f"no sweep index under {results}"
    return json.loads(indexes[-1].read_text())


def stop_ray_head(process: subprocess.Popen) -> None:
    """Stop the head started by :func:`ray_head`: SIGTERM to ``ray start --block`` drains the node and stops
    its processes in order; whatever of its process group outlives that is killed. Its workers run in
    sessions of their own and exit with their raylet."""
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A real single-node Ray cluster for this module's tests; yields its address ``127.0.0.1:PORT``."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip('Ray is not installed (pip install -e ".[ray]")')
    # a short folder of its own: Ray's socket paths must stay under 108 bytes, and nothing is shared with /tmp/ray
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    log, port = temp_dir / "head.log", free_port()
    command = [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={port}", f"--ray-client-server-port={free_port()}", f"--num-cpus={CLUSTER_CPUS}",
        f"--num-gpus={CLUSTER_GPUS}", "--object-store-memory=100000000", "--include-dashboard=false",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    with log.open("w") as output:
        head = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **LOCAL_RAY}
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None, f"ray start failed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        stop_ray_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cluster_running() -> bool:
    """Whether any Ray cluster's GCS server runs on this machine (Linux: read from /proc)."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):  # the process may end while we look
            if comm.read_text().strip() == "gcs_server":
                return True
    return False


def ray_sweep(address: str, results: Path, *grid: str) -> tuple[int, str, str]:
    """A sweep through ``hydra/launcher=ray`` on the test cluster; ``num_gpus`` stays the preset's."""
    process = clbench(
        "-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address={address}",
        "hydra.launcher.ray.remote.num_cpus=1", *grid, f"results_dir={results}", *TINY,
        cwd=results.parent, env=LOCAL_RAY,
    )  # fmt: skip
    return finish(process)


def placements(stdout: str) -> dict[int, tuple[str, dict[str, float]]]:
    """The launcher's ``#k ran on NODE with {resources}`` lines: job number -> (node, resources)."""
    return {
        int(m[1]): (m[2], ast.literal_eval(m[3])) for m in re.finditer(r"#(\d+) ran on (\S+) with (\{[^}]*\})", stdout)
    }


def test_ray_launcher_without_a_cluster_says_how_to_start_one(tmp_path):
    """``address=auto`` finds no cluster: one line, exit code 2. Ray's ``auto`` joins any cluster running on the
    machine, so this runs before the module's cluster starts."""
    if ray_cluster_running():
        pytest.skip("a Ray cluster runs on this machine")
    sweep = clbench(
        "-m", "hydra/launcher=ray", "seed=0,1", f"results_dir={tmp_path / 'results'}", *TINY,
        cwd=tmp_path, env={**LOCAL_RAY, "RAY_TMPDIR": str(tmp_path), "RAY_ADDRESS": ""},
    )  # fmt: skip
    code, _, err = finish(sweep)
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "clbench: error: no Ray cluster answers at 'auto' (Could not find any running Ray instance): start one "
        "with `ray start --head` or name its head with hydra.launcher.ray.init.address=HOST:PORT"
    )


@pytest.mark.slow  # a real Ray head (about 10 s to start) and six jobs in fresh processes: about a minute
def test_ray_cluster_runs_a_2x2_sweep_and_a_relaunch_runs_only_what_is_missing(ray_head, tmp_path):
    results = tmp_path / "results"
    code, out, err = ray_sweep(ray_head, results, "strategy=finetune,joint", "seed=0")  # half of the grid
    assert code == 0, err[-3000:]
    first = {key: (path.read_bytes(), path.stat().st_mtime_ns) for key, path in result_files(results).items()}
    assert set(first) == {("finetune", "0"), ("joint", "0")}

    code, out, err = ray_sweep(ray_head, results, *GRID)
    assert code == 0, err[-3000:]
    runs = result_files(results)
    assert set(runs) == {(s, seed) for s in ("finetune", "joint") for seed in ("0", "1")}
    assert all(json.loads(path.read_text())["status"] == "completed" for path in runs.values())
    for key, (content, mtime) in first.items():  # the half already done was read back, not trained again
        assert (runs[key].read_bytes(), runs[key].stat().st_mtime_ns) == (content, mtime), key
    index = newest_index(results)
    assert index["counts"] == {"completed": 4}
    assert {Path(job["result"]) for job in index["jobs"]} == set(runs.values())
    # every job ran on the cluster's node with the preset's one GPU and the one CPU asked for
    ran = placements(out)
    assert sorted(ran) == [0, 1, 2, 3], out[-3000:]
    assert all(node == "127.0.0.1" and resources == {"CPU": 1.0, "GPU": 1.0} for node, resources in ran.values())


@pytest.mark.slow  # needs the real Ray head of the 2x2 sweep above; unslowed it would start the head alone
def test_ray_sweep_no_node_can_hold_is_refused_in_one_line(ray_head, tmp_path):
    """Asking for more GPUs per job than any node has would leave the jobs pending forever."""
    code, _, err = ray_sweep(
        ray_head, tmp_path / "results", f"hydra.launcher.ray.remote.num_gpus={CLUSTER_GPUS + 1}", "seed=0,1"
    )
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("clbench: error: no live node of the Ray cluster can hold one job asking for")
    assert "num_gpus=3" in line and "hydra.launcher.ray.remote.num_gpus=0" in line
    assert not list((tmp_path / "results").glob("split_digits/*/*/result.json"))


def test_fitting_nodes_reads_every_resource_a_job_asks_for():
    from hydra_plugins.clbench_launchers.ray_launcher import fitting_nodes

    nodes = [
        {"NodeManagerAddress": "a", "Alive": True, "Resources": {"CPU": 8.0}},
        {"NodeManagerAddress": "b", "Alive": True, "Resources": {"CPU": 4.0, "GPU": 2.0, "memory": 8e9}},
        {"NodeManagerAddress": "c", "Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
    ]
    assert fitting_nodes(nodes, {}) == ["a", "b"]  # Ray's default: one CPU
    assert fitting_nodes(nodes, {"num_cpus": 6}) == ["a"]
    assert fitting_nodes(nodes, {"num_gpus": 1, "num_cpus": 2}) == ["b"]
    assert fitting_nodes(nodes, {"num_gpus": 0.5, "memory": 16e9}) == []
    assert fitting_nodes(nodes, {"num_gpus": 4}) == []  # the dead node does not count


@pytest.mark.slow  # four submitit processes, about a minute; tests/test_sweeps.py runs a 2-job submitit_local sweep
def test_submitit_local_executor_runs_the_2x2_sweep(tmp_path):
    results = tmp_path / "results"
    sweep = clbench("-m", "hydra/launcher=submitit_local", *GRID, f"results_dir={results}", *TINY, cwd=tmp_path)
    code, _, err = finish(sweep)
    assert code == 0, err[-3000:]
    runs = result_files(results)
    assert set(runs) == {(s, seed) for s in ("finetune", "joint") for seed in ("0", "1")}
    index = newest_index(results)
    assert index["counts"] == {"completed": 4}
    assert {Path(job["result"]) for job in index["jobs"]} == set(runs.values())
    # each job ran in a process of its own that submitit started, with its own log folder
    assert len(list(results.glob("_hydra/sweeps/*/.submitit/*/*_result.pkl"))) == 4


# Runs the SLURM preset up to the moment submitit would call sbatch, and prints the script instead.
RENDER_SBATCH = """
import sys
import submitit.slurm.slurm as slurm

class Rendered(Exception):
    pass

def render(self, command):
    print("SBATCH-SCRIPT-BEGIN")
    print(self._make_submission_file_text(command, "render"))
    raise Rendered

slurm.SlurmExecutor.affinity = classmethod(lambda cls: 1)  # no srun here: pretend we are on a login node
slurm.SlurmExecutor._submit_command = render
from clbench.__main__ import main
sys.argv = ["clbench", *sys.argv[1:]]
try:
    main()
except Rendered:
    sys.exit(0)
sys.exit("the SLURM launcher never submitted")
"""


def test_submitit_slurm_preset_renders_the_sbatch_script_it_would_submit(tmp_path):
    done = subprocess.run(
        [
            sys.executable, "-c", RENDER_SBATCH, "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
            "hydra.launcher.timeout_min=600", *GRID, f"results_dir={tmp_path / 'results'}", *TINY,
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    script = done.stdout.split("SBATCH-SCRIPT-BEGIN", 1)[1]
    directives = dict(
        line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines() if line.startswith("#SBATCH --")
    )
    assert directives["partition"] == "gpu"
    assert directives["gres"] == "gpu:1"  # one GPU per array task, from the preset
    assert directives["time"] == "600"
    assert directives["array"] == "0-3%4"  # the 2x2 grid as one job array
    assert directives["cpus-per-task"] == "4"
    command = [line for line in script.splitlines() if "submitit.core._submit" in line]
    assert len(command) == 1 and command[0].startswith("srun ")
    assert f"{sys.executable} -u -m submitit.core._submit" in command[0]
    # the array's four tasks would each run one pickled job, waiting in the sweep's submitit folder: the grid
    from submitit.core.utils import DelayedSubmission

    pickled = [DelayedSubmission.load(p) for p in (tmp_path / "results").glob("_hydra/sweeps/*/.submitit/*.pkl")]
    grid = {tuple(sorted(o for o in job.args[0] if o.startswith(("strategy=", "seed=")))) for job in pickled}
    assert grid == {(f"seed={seed}", f"strategy={s}") for s in ("finetune", "joint") for seed in (0, 1)}


def test_two_processes_write_one_results_tree_that_the_report_reads_as_one(tmp_path, capsys):
    """What jobs on several machines sharing one results_dir do: write different runs at the same time."""
    results = tmp_path / "shared"
    writers = [
        clbench(f"strategy={strategy}", "seed=0", f"results_dir={results}", *TINY, cwd=tmp_path)
        for strategy in ("finetune", "joint")
    ]
    for writer in writers:
        code, _, err = finish(writer)
        assert code == 0, err[-3000:]
    runs = result_files(results)
    assert set(runs) == {("finetune", "0"), ("joint", "0")}
    assert all(json.loads(path.read_text())["status"] == "completed" for path in runs.values())
    assert not list(results.rglob("*.tmp")) and not list(results.rglob(".lock"))  # no half-written file, no lock left
    from clbench.report import main as report  # in-process: it only reads the files both wrote

    capsys.readouterr()
    assert report([str(results), "--format", "json", "--no-plots"]) == 0
    rows = sorted((row["strategy"], row["n"], row["code_versions"]) for row in json.loads(capsys.readouterr().out))
    assert rows == [("finetune", 1, 1), ("joint", 1, 1)]  # one table: both runs, from one code version


def test_ray_launcher_without_ray_names_the_install_in_one_line(tmp_path):
    (tmp_path / "no_ray" / "ray").mkdir(parents=True)
    (tmp_path / "no_ray" / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    sweep = clbench(
        "-m", "hydra/launcher=ray", "seed=0,1", f"results_dir={tmp_path / 'results'}", *TINY,
        cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "no_ray")},
    )  # fmt: skip
    code, _, err = finish(sweep)
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "clbench: error: hydra/launcher=ray needs Ray (No module named 'ray'): pip install -e \".[ray]\""
    )


def test_ray_launcher_names_an_unreachable_head_in_seconds(tmp_path):
    """Ray itself would retry a wrong HOST:PORT for minutes."""
    port = free_port()
    sweep = clbench(
        "-m", "hydra/launcher=ray", f"hydra.launcher.ray.init.address=127.0.0.1:{port}", "seed=0,1",
        f"results_dir={tmp_path / 'results'}", *TINY, cwd=tmp_path, env=LOCAL_RAY,
    )  # fmt: skip
    code, _, err = finish(sweep, timeout=120)
    assert code == 2, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"clbench: error: no Ray cluster answers at '127.0.0.1:{port}' ([Errno 111] Connection")
