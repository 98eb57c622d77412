"""What copying each epoch's checkpoint to the run's artifact store costs the training.

    python benchmarks/checkpoint_upload.py [--epochs 3] [--fashion DIR] [--celeba DIR] [--recipes mnist,celeba]

For the MNIST recipe on real Fashion-MNIST and the CelebA recipe on generated faces, with a local
SQLite store and with an MLflow tracking server on loopback (its own artifact store, as a team runs
it), `cnnflow train` runs twice: `train.checkpoint_every=1` (every epoch uploaded, the default) and
`train.checkpoint_every=1000` (only the last). The cost is the difference of their median later-epoch
times (MLflow's `epoch_seconds`, the first epoch left out), as % of the epoch; the upload's own
time (`checkpoint_upload_seconds`, in a background thread) is shown beside it. One run per cell:
the difference is within the epoch-to-epoch noise printed with it. Results go to
benchmarks/results/checkpoint_upload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPES = {
    "mnist": lambda args: ["experiment=fashion_mnist", "data.source=idx", f"data.path={args.fashion}"],
    "celeba": lambda args: ["experiment=celeba", f"data.path={args.celeba}"],
}


def tracking_server(folder: Path, port: int = 5091) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                               "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                return server, uri
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the MLflow server did not start")


def trained(overrides: list[str], uri: str, workdir: Path) -> dict:
    """One `cnnflow train` in a new process; its later epochs and upload times from MLflow."""
    from mlflow import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", "train", *overrides, "plots={}"], cwd=workdir,
                         env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"cnnflow train {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    run_id = out.stderr.split("done: run ")[-1].split(",")[0].strip()
    epochs = [m.value for m in sorted(client.get_metric_history(run_id, "epoch_seconds"), key=lambda m: m.step)]
    uploads = [m.value for m in client.get_metric_history(run_id, "checkpoint_upload_seconds")]
    return {"later_epochs": epochs[1:], "uploads": uploads,
            "precision": client.get_run(run_id).data.tags.get("precision")}


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
                    cells = {}
                    for every in (1, 1000):  # each upload, then only the last
                        overrides = RECIPES[recipe](args) + [f"train.epochs={args.epochs}",
                                                             f"train.checkpoint_every={every}"]
                        cells[every] = trained(overrides, uri, root / recipe / f"every{every}")
                    with_uploads = statistics.median(cells[1]["later_epochs"])
                    without = statistics.median(cells[1000]["later_epochs"])
                    rows.append({"recipe": recipe, "store": store, "precision": cells[1]["precision"],
                                 "epoch_with_uploads": with_uploads, "epoch_without": without,
                                 "cost_percent": 100 * (with_uploads - without) / without,
                                 "upload_seconds_median": statistics.median(cells[1]["uploads"]),
                                 "later_epochs": {str(k): v["later_epochs"] for k, v in cells.items()}})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.terminate()
    print("\n| recipe | store | epoch, upload every epoch | epoch, last only | cost | one upload (background) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} ({row['precision']}) | {row['store']} | {row['epoch_with_uploads']:.1f} s | "
              f"{row['epoch_without']:.1f} s | {row['cost_percent']:+.1f}% | {row['upload_seconds_median']:.2f} s |")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "checkpoint_upload.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
