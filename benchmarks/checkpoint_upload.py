"""What copying each epoch's checkpoint to the run's artifact store costs the training.

    python benchmarks/checkpoint_upload.py [--epochs 3] [--fashion DIR] [--celeba DIR] [--recipes mnist,celeba]

For the MNIST recipe on real Fashion-MNIST and the CelebA recipe on generated faces, with a local
SQLite store and with an MLflow tracking server on loopback (its own artifact store, as a team runs
it), `cnnflow train` runs with `train.checkpoint_every=1` (every epoch uploaded, the default) and
with `train.checkpoint_every=1000` (only the last epoch).

The cost is counted in CPU time, which a noisy shared machine does not blur: the part of a
checkpoint the epoch waits for (`checkpoint_stage_seconds`: hard link, sha256), the CPU time of the
upload thread (`checkpoint_upload_cpu_seconds`) and, for the server, the server's CPU time per upload
(the difference between the two runs); on 2 cores that training keeps busy, every CPU second the
upload takes is taken from training. It is shown as % of the median later epoch. The two runs'
later-epoch times are printed beside it as a cross-check (one run each: within their noise). Results
go to benchmarks/results/checkpoint_upload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import free_port, wait_until  # noqa: E402  (tests/conftest.py: the servers the tests start too)

RECIPES = {
    "mnist": lambda args: ["experiment=fashion_mnist", "data.source=idx", f"data.path={args.fashion}"],
    "celeba": lambda args: ["experiment=celeba", f"data.path={args.celeba}"],
}


def tracking_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                               "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    wait_until(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, 120, "the MLflow server")
    return server, uri


def cpu_seconds(pid: int) -> float:
    import psutil

    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(sum(process.cpu_times()[:2]) for process in family)


def trained(overrides: list[str], uri: str, workdir: Path) -> dict:
    """One `cnnflow train` in a new process; its later epochs and checkpoint costs from MLflow."""
    from mlflow import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", "train", *overrides, "plots=none"], cwd=workdir,
                         env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"cnnflow train {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    run_id = out.stderr.split("done: run ")[-1].split(",")[0].strip()
    epochs = [m.value for m in sorted(client.get_metric_history(run_id, "epoch_seconds"), key=lambda m: m.step)]
    costs = {name: [m.value for m in client.get_metric_history(run_id, f"checkpoint_{name}_seconds")]
             for name in ("stage", "upload", "upload_cpu")}
    return {"later_epochs": epochs[1:], **costs, "precision": client.get_run(run_id).data.tags.get("precision")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fashion", type=Path, default=HERE.parent.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--celeba", type=Path, default=Path("/work/runs/celeba_full"),
                        help="a folder in CelebA's layout (benchmarks/celeba_full.py generates one)")
    parser.add_argument("--recipes", default="mnist,celeba")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnflow-upload-") as temporary:
        root = Path(temporary)
        server, server_uri = tracking_server(root / "server")
        try:
            for recipe in args.recipes.split(","):
                for store, uri in (("local SQLite", f"sqlite:///{root / recipe / 'mlflow.db'}"), ("tracking server", server_uri)):
                    cells, server_cpu = {}, {}
                    for every in (1, 1000):  # each epoch uploaded, then only the last
                        before = cpu_seconds(server.pid)
                        overrides = RECIPES[recipe](args) + [f"train.epochs={args.epochs}",
                                                             f"train.checkpoint_every={every}"]
                        cells[every] = trained(overrides, uri, root / recipe / store.split()[0] / f"every{every}")
                        server_cpu[every] = cpu_seconds(server.pid) - before
                    uploads = len(cells[1]["upload"]) - len(cells[1000]["upload"])
                    on_server = max(0.0, server_cpu[1] - server_cpu[1000]) / uploads if uri == server_uri else 0.0
                    epoch = statistics.median(cells[1]["later_epochs"])
                    per_upload = statistics.median(cells[1]["stage"]) + statistics.median(cells[1]["upload_cpu"]) + on_server
                    rows.append({"recipe": recipe, "store": store, "precision": cells[1]["precision"], "epoch": epoch,
                                 "stage": statistics.median(cells[1]["stage"]),
                                 "upload_wall": statistics.median(cells[1]["upload"]),
                                 "upload_cpu": statistics.median(cells[1]["upload_cpu"]), "server_cpu": on_server,
                                 "cost_percent": 100 * per_upload / epoch,
                                 "later_epochs": {str(k): v["later_epochs"] for k, v in cells.items()}})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.terminate()
    print("\n| recipe | store | epoch | waited for | upload (background) | its CPU | server CPU | cost | later epochs: every epoch / last only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        epochs = " / ".join(", ".join(f"{v:.1f}" for v in row["later_epochs"][k]) for k in ("1", "1000"))
        print(f"| {row['recipe']} ({row['precision']}) | {row['store']} | {row['epoch']:.1f} s | {row['stage']:.2f} s | "
              f"{row['upload_wall']:.2f} s | {row['upload_cpu']:.2f} s | {row['server_cpu']:.2f} s | "
              f"{row['cost_percent']:.1f}% | {epochs} s |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "checkpoint_upload.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
