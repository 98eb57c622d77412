"""A search on a pool of 2 workers against the same search on 1 worker (benchmarks/README.md, "Search").

    python benchmarks/search_workers.py --data ../shared/data/fashion-mnist [--trials 6 --epochs 2]

Starts an MLflow tracking server, a Prefect server and `cnnflow deploy --pool box` in a temporary
folder, then, alternating, runs the same study (random sampler, seed 0, no pruner: the same trials
and the same epochs whatever the timing) with `cnnflow search --pool box` and `search.parallel` 1
on one worker, then 2 on two workers. Each worker is `prefect worker start`, started for its phase
and stopped after it. Prints the wall and CPU seconds of each phase and the ratio two/one, and the
CPU seconds the MLflow server, the Prefect server and the search command took in the phase (each
with everything it started): on two machines they would run elsewhere, here they share the cores.
The search command's and the workers' logs are kept in benchmarks/results/search_workers-TIME/.

With --core-each, worker i and every process it starts are held to CPU core i (both phases), as if
each worker were a one-core machine of its own; the servers and the search command run on any core.
On a machine with as many cores as one training keeps busy, that is the only way two workers can
show what they gain on two machines.

With --servers-apart, the MLflow server, the Prefect server and the search command (and all they
start) run at the lowest CPU priority (nice 19), a stand-in for a machine of their own: they get the
CPU time the trainings leave (a training waiting on them leaves its core), and take none from them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / f"search_workers-{time.strftime('%Y-%m-%d-%H%M%S')}"
sys.path[:0] = [str(HERE.parent / "tests")]

from conftest import free_port, kill_tree, reaped_with_us, start_server, start_worker  # noqa: E402


def servers(root: Path) -> tuple[list[subprocess.Popen], dict[str, str]]:
    mlflow_port, prefect_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", TF_CPP_MIN_LOG_LEVEL="2",
               PREFECT_WORKER_QUERY_SECONDS="2", PREFECT_API_URL=f"http://127.0.0.1:{prefect_port}/api",
               MLFLOW_TRACKING_URI=f"http://127.0.0.1:{mlflow_port}")
    started = [
        start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                      "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
                      str(root / "artifacts"), "--workers", "1"],
                     f"http://127.0.0.1:{mlflow_port}/health", env, root / "mlflow.log"),
        start_server([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                      str(prefect_port)], f"http://127.0.0.1:{prefect_port}/api/health", env, root / "prefect.log"),
    ]
    return started, env


def cnnflow(args: list[str], folder: Path, env: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cnnflow.log", "a") as log:
        done = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", *args], cwd=folder, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"cnnflow {' '.join(args)} failed (exit {done.returncode}); see {folder / 'cnnflow.log'}")


class CpuSeconds:
    """CPU seconds each named process tree used since the phase began (processes that end are
    counted as they were last seen; sampling every second loses at most that second of theirs)."""

    def __init__(self, roots: dict[str, int]):
        self.roots, self.last, self.before = roots, {}, {}
        self.sample()
        self.before = dict(self.last)

    def sample(self) -> None:
        for name, pid in self.roots.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(pid)
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        times = process.cpu_times()
                        self.last[name, process.pid] = times.user + times.system

    def totals(self) -> dict[str, float]:
        used = {name: 0.0 for name in self.roots}
        for (name, pid), seconds in self.last.items():
            used[name] += seconds - self.before.get((name, pid), 0.0)
        return used


def lowest_priority(pid: int) -> None:
    """nice 19 for a process and everything it has started."""
    for process in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.nice(19)


def timed_search(root: Path, env: dict[str, str], workers: int, name: str, space: list[str], core_each: bool,
                 servers: dict[str, int], apart: bool) -> tuple[float, dict[str, float]]:
    """Wall seconds of the search command, and the CPU seconds, in that time, of everything the workers
    ran for it (`workers`), of each of `servers` and of the search command."""
    cores = sorted(os.sched_getaffinity(0))

    def on_core(i: int):  # affinity is inherited, so the flow runs a worker starts stay on its core
        return (lambda: os.sched_setaffinity(0, {cores[i]})) if core_each else None

    pool = [start_worker("box", f"{name}-w{i}", root, env, preexec_fn=on_core(i)) for i in range(workers)]
    search = None
    try:
        time.sleep(10)  # the workers poll the pool before the first trial is submitted
        (root / name).mkdir()
        for pid in servers.values() if apart else ():  # again: a server may have started processes since
            lowest_priority(pid)
        cpu = CpuSeconds({**{f"w{i}": worker.pid for i, worker in enumerate(pool)}, **servers})
        started = time.perf_counter()
        search = reaped_with_us(subprocess.Popen(
            [sys.executable, "-m", "cnnflow.flows.cli", "search", "--pool", "box", f"search.name={name}",
             f"search.parallel={workers}", *space], cwd=root / name, env=env, start_new_session=True,
            preexec_fn=(lambda: os.nice(19)) if apart else None, stdout=open(root / f"{name}.log", "w"),
            stderr=subprocess.STDOUT))
        cpu.roots["search command"] = search.pid
        while search.poll() is None:
            cpu.sample()
            time.sleep(1)
        wall = time.perf_counter() - started
        if search.returncode:
            said = [line for line in (root / f"{name}.log").read_text().splitlines() if line.strip()][-1:]
            raise SystemExit(f"the search {name} failed (exit {search.returncode}): {''.join(said)}\n"
                             f"its log and the workers' are kept in {RESULTS}")
        used = cpu.totals()
        return wall, {"workers": sum(used.pop(f"w{i}") for i in range(workers)), **used}
    finally:
        for process in [*pool, search] if search else pool:
            kill_tree(process.pid)
        for log in root.glob(f"{name}*.log"):  # the search command's and the workers', kept for a look
            shutil.copy(log, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the Fashion-MNIST IDX folder")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2, help="per trial")
    parser.add_argument("--repeats", type=int, default=1, help="pairs (one worker, two workers)")
    parser.add_argument("--core-each", action="store_true", help="hold worker i to CPU core i (see above)")
    parser.add_argument("--servers-apart", action="store_true",
                        help="the servers and the search command at nice 19 (see above)")
    parser.add_argument("extra", nargs="*", help="after --: more overrides (tests shrink the data)")
    args = parser.parse_args()
    if args.core_each and len(os.sched_getaffinity(0)) < 2:
        parser.error(f"--core-each needs 2 CPU cores; this process may use {sorted(os.sched_getaffinity(0))}")
    space = ["experiment=fashion_mnist_fast", "search=fashion_mnist_fast", "data.source=idx",
             f"data.path={args.data.resolve()}", f"train.epochs={args.epochs}", f"search.trials={args.trials}",
             "search.epochs=null", "search.sampler=random", "search.seed=0", "search.pruner=none", *args.extra]
    RESULTS.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started, env = servers(root)
        try:
            cnnflow(["deploy", "--pool", "box"], root / "deployer", env)
            times: dict[int, list[tuple[float, dict[str, float]]]] = {1: [], 2: []}
            for repeat in range(args.repeats):
                for workers in (1, 2):  # alternate, so a slow phase of the machine hits both
                    wall, cpu = timed_search(root, env, workers, f"w{workers}-r{repeat}", space, args.core_each,
                                             {"MLflow server": started[0].pid, "Prefect server": started[1].pid},
                                             args.servers_apart)
                    times[workers].append((wall, cpu))
                    print(f"{workers} worker(s): {args.trials} trials x {args.epochs} epochs in {wall:.0f} s wall, "
                          f"{cpu['workers']:.0f} s CPU; beside them, CPU s: "
                          + ", ".join(f"{name} {seconds:.0f}" for name, seconds in cpu.items() if name != "workers")
                          + f" (of {wall * len(os.sched_getaffinity(0)):.0f} the cores gave)", flush=True)
        finally:
            for process in started:
                kill_tree(process.pid)
    ratio = statistics.median(two[0] / one[0] for one, two in zip(times[1], times[2]))
    print(f"2 workers / 1 worker, wall time: {ratio:.2f}x (median over {args.repeats} pair(s); "
          f"{os.cpu_count()} CPU cores on this machine"
          + (", each worker held to a core of its own" if args.core_each else "")
          + (", the servers and the search command at nice 19)" if args.servers_apart else ")"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the finally blocks above have stopped the workers and the servers
        print("interrupted: workers and servers stopped; the phase under way is not counted", file=sys.stderr)
        sys.exit(130)
