"""Where the time before the first training step goes, measured in fresh processes.

    python benchmarks/startup.py [--repeats 3]

Prints the median import time of each heavy dependency, and the seconds from `cnnflow train` to its
first training step (the run's `startup_seconds` metric) twice: with the temporary Prefect server
that a bare command starts, and against an already running Prefect server (PREFECT_API_URL), which
is what a team that keeps `prefect server start` up gets.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from run import cnnflow_train  # benchmarks/run.py, beside this script

IMPORTS = {
    "cnnflow CLI (cnnflow.flows.cli)": "import cnnflow.flows.cli",
    "tensorflow + keras": "import tensorflow, keras",
    "prefect (flow engine)": "import prefect.main",
    "mlflow": "import mlflow, mlflow.keras",
    "hydra compose": "from cnnflow.flows.config import compose_config; compose_config('quickstart')",
}


def seconds_to_run(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - started


def startup_of_a_training(workdir: Path, env: dict[str, str]) -> float:
    _, run = cnnflow_train(["train.epochs=1", "plots={}"], workdir, env)
    return run.data.metrics["startup_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    print(f"{'import (fresh process, median of ' + str(args.repeats) + ')':<48}{'seconds':>8}")
    for label, code in IMPORTS.items():
        print(f"{label:<48}{statistics.median(seconds_to_run(code) for _ in range(args.repeats)):>8.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        temporary = [startup_of_a_training(workdir, env) for _ in range(args.repeats)]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=dict(env, PREFECT_HOME=str(workdir / "prefect")),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/api"
            for _ in range(120):
                try:
                    if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                        break
                except OSError:
                    time.sleep(0.5)
            running = [startup_of_a_training(workdir, dict(env, PREFECT_API_URL=url)) for _ in range(args.repeats)]
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"{'cnnflow train -> first step, temporary Prefect server':<48}{statistics.median(temporary):>8.1f}")
    print(f"{'cnnflow train -> first step, running Prefect server':<48}{statistics.median(running):>8.1f}")


if __name__ == "__main__":
    main()
