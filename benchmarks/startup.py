"""Where the time before the first training step goes, measured in fresh processes, in one sitting.

    python benchmarks/startup.py [--mnist DIR] [--repeats 3]

Prints the median import time of each heavy dependency; then, alternating in every repeat, the
seconds from process start to the first training step of the plain Keras script
(`plain_mnist.py`) and of `cnnflow train` on the same data and recipe (the run's `startup_seconds`
metric), with no Prefect server configured (the flow runs in process) and against a running Prefect
server (PREFECT_API_URL, which records the flow run); and the whole `cnnflow predict` of one image.
A first `cnnflow train`, which measures `auto` precision in a fresh cache folder, is shown apart.
DIR holds MNIST-format IDX files (default: ../shared/data/fashion-mnist, else generated digits).

    python benchmarks/startup.py --baseline OTHER/bin/python

also alternates `cnnflow train` run by another installation (an earlier commit's code in a virtual
environment of its own, made with --system-site-packages so every library is the same) and prints
the paired difference: what a change of cnnflow's own code cost in start-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from run import cnnflow_train  # noqa: E402  (benchmarks/run.py)

IMPORTS = {
    "cnnflow CLI (cnnflow.flows.cli)": "import cnnflow.flows.cli",
    "tensorflow + keras": "import tensorflow, keras",
    "prefect (flow engine)": "import prefect.main",
    "mlflow": "import mlflow, mlflow.keras",
    "hydra compose": "from cnnflow.flows.setup.config import compose_config; compose_config('quickstart')",
}
TRAIN, VALID = 2000, 500


def seconds_to_run(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=cwd)
    return time.perf_counter() - started


def plain_startup(folder: Path) -> float:
    import json

    out = subprocess.run([sys.executable, str(HERE / "plain_mnist.py"), str(folder), "--train-size", str(TRAIN),
                          "--valid-size", str(VALID), "--epochs", "1"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["startup_seconds"]


def cnnflow_startup(folder: Path, workdir: Path, env: dict[str, str], python: str = sys.executable) -> tuple[float, str]:
    _, run = cnnflow_train(["experiment=mnist", "data.source=idx", f"data.path={folder}", f"data.train_size={TRAIN}",
                            f"data.valid_size={VALID}", "train.epochs=1", "plots=none"], workdir, env, python=python)
    return run.data.metrics["startup_seconds"], run.info.run_id


def one_image(folder: Path, workdir: Path) -> Path:
    import gzip

    import numpy as np
    from PIL import Image

    raw = gzip.open(folder / "t10k-images-idx3-ubyte.gz").read()
    path = workdir / "one.png"
    Image.fromarray(np.frombuffer(raw, np.uint8, 28 * 28, offset=16).reshape(28, 28)).save(path)
    return path


def running_prefect_server(workdir: Path, env: dict[str, str]):
    import urllib.request

    from conftest import free_port, wait_until

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=dict(env, PREFECT_HOME=str(workdir / "prefect")),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 120, "the Prefect server")
    return server, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, default=HERE.parent.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", help="another installation's python: its cnnflow train, alternated with this one's")
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    print(f"{'import (fresh process, median of ' + str(args.repeats) + ')':<58}{'seconds':>8}")
    for label, code in IMPORTS.items():
        seconds = statistics.median(seconds_to_run([sys.executable, "-c", code]) for _ in range(args.repeats))
        print(f"{label:<58}{seconds:>8.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = args.mnist
        if not (folder / "train-images-idx3-ubyte.gz").exists():
            from conftest import make_idx_folder

            folder = make_idx_folder(workdir / "idx", train=TRAIN + VALID, test=100)
        image = one_image(folder, workdir)
        # runtime.precision=auto measures once per machine and model, in the first training: that one
        # is not timed with the others (it starts later by the measuring, said here)
        env["XDG_CACHE_HOME"] = str(workdir / "cache")
        first, run_id = cnnflow_startup(folder, workdir, env)
        print(f"{'first cnnflow train here, measuring auto precision':<58}{first:>8.1f}")
        times: dict[str, list[float]] = {"plain": [], "in process": [], "server": [], "predict": [],
                                         "predict, server": []}
        for _ in range(args.repeats):  # alternate, so a slow phase of the machine hits every contender
            times["plain"].append(plain_startup(folder))
            seconds, run_id = cnnflow_startup(folder, workdir, env)
            times["in process"].append(seconds)
            if args.baseline:
                times.setdefault("baseline", []).append(cnnflow_startup(folder, workdir, env, args.baseline)[0])
            predict = [sys.executable, "-m", "cnnflow.flows.cli", "predict", run_id, str(image)]
            times["predict"].append(seconds_to_run(predict, env, workdir))
        server, url = running_prefect_server(workdir, env)
        try:
            for _ in range(args.repeats):
                times["server"].append(cnnflow_startup(folder, workdir, dict(env, PREFECT_API_URL=url))[0])
                times["predict, server"].append(seconds_to_run(predict, dict(env, PREFECT_API_URL=url), workdir))
        finally:
            server.terminate()
            server.wait(timeout=30)
    labels = {"plain": "plain Keras script -> first training step",
              "in process": "cnnflow train -> first step, no Prefect server configured",
              "server": "cnnflow train -> first step, running Prefect server",
              "predict": "cnnflow predict, one image, whole command",
              "predict, server": "cnnflow predict, one image, running Prefect server"}
    if args.baseline:
        labels["baseline"] = f"cnnflow train -> first step, run by {args.baseline}"
    for key, label in labels.items():
        print(f"{label:<58}{statistics.median(times[key]):>8.1f}   ({', '.join(f'{t:.1f}' for t in times[key])})")
    gap = statistics.median(a - b for a, b in zip(times["in process"], times["plain"]))
    print(f"cnnflow train - plain script, first step (median of paired differences): {gap:+.1f} s")
    if args.baseline:
        gap = statistics.median(a - b for a, b in zip(times["in process"], times["baseline"]))
        print(f"cnnflow train - the baseline's, first step (median of paired differences): {gap:+.1f} s")


if __name__ == "__main__":
    main()
