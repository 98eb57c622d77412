"""What copying each epoch's checkpoint to the run's artifact store costs the training.

    python benchmarks/checkpoint_upload.py [--epochs 3] [--fashion DIR] [--celeba DIR] [--recipes mnist,celeba]
    python benchmarks/checkpoint_upload.py --positions 0.05   # positions inside epochs, every 3 s
    python benchmarks/checkpoint_upload.py ... data.train_size=2000   # Hydra overrides for every run

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

With `--positions MINUTES` the two runs are `train.checkpoint_minutes=MINUTES` and `=0` instead
(epoch checkpoints uploaded in both), and the cost is the positions': per later epoch, what training
waited for (`position_seconds`), the writing thread's CPU (`position_write_cpu_seconds`: the
arrays, their sha256s, the staging), the upload's CPU (`position_upload_cpu_seconds`) and the
server's CPU per position, as % of that epoch's CPU seconds (`epoch_cpu_seconds`). Results go to
benchmarks/results/position_upload.json.
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
    """One `cnnflow train` in a new process: {"metrics": {name: {step: value}}, "precision": ...}, every
    metric it logged (values logged more than once at a step, one per position, summed)."""
    from mlflow import MlflowClient

    workdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", "train", *overrides, "plots=none"], cwd=workdir,
                         env=dict(os.environ, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"cnnflow train {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=uri)
    run_id = out.stderr.split("done: run ")[-1].split(",")[0].strip()
    run = client.get_run(run_id)
    metrics = {}
    for name in run.data.metrics:
        metrics[name] = {}
        for metric in client.get_metric_history(run_id, name):
            metrics[name][metric.step] = metrics[name].get(metric.step, 0.0) + metric.value
    return {"metrics": metrics, "precision": run.data.tags.get("precision")}


def later(cell: dict, name: str) -> list[float]:
    """The metric's values after epoch 1 (which also builds and traces), one per epoch."""
    values = cell["metrics"].get(name, {})
    return [values[step] for step in sorted(values) if step > 1]


def epoch_checkpoint_row(cells: dict, on_server_total: float) -> dict:
    """Each epoch's checkpoint uploaded (cells[1]) against only the last (cells[1000])."""
    every, last_only = cells[1]["metrics"], cells[1000]["metrics"]
    count = len(every["checkpoint_upload_seconds"]) - len(last_only["checkpoint_upload_seconds"])
    on_server = max(0.0, on_server_total) / count
    epoch = statistics.median(later(cells[1], "epoch_seconds"))
    stage, upload_cpu = (statistics.median(every[f"checkpoint_{n}_seconds"].values()) for n in ("stage", "upload_cpu"))
    return {"epoch": epoch, "stage": stage, "upload_wall": statistics.median(every["checkpoint_upload_seconds"].values()),
            "upload_cpu": upload_cpu, "server_cpu": on_server, "cost_percent": 100 * (stage + upload_cpu + on_server) / epoch,
            "later_epochs": {str(k): later(v, "epoch_seconds") for k, v in cells.items()}}


def position_row(cells: dict, on_server_total: float) -> dict:
    """Positions every few seconds (cells["on"]) against none (cells["off"]), per later epoch."""
    on = cells["on"]["metrics"]
    on_server = max(0.0, on_server_total) / sum(on["positions"].values())
    epochs = []
    for step in sorted(on["epoch_cpu_seconds"])[1:]:
        cost = {name: on.get(metric, {}).get(step, 0.0) for name, metric in (
            ("positions", "positions"), ("waited", "position_seconds"), ("write_cpu", "position_write_cpu_seconds"),
            ("upload_cpu", "position_upload_cpu_seconds"))}
        cost["server_cpu"] = on_server * cost["positions"]
        spent = cost["waited"] + cost["write_cpu"] + cost["upload_cpu"] + cost["server_cpu"]
        epochs.append({"cpu": on["epoch_cpu_seconds"][step], **cost, "cost_percent": 100 * spent / on["epoch_cpu_seconds"][step]})
    return {"epochs": epochs, "cost_percent": statistics.median(e["cost_percent"] for e in epochs),
            "later_epoch_cpu": {k: later(v, "epoch_cpu_seconds") for k, v in cells.items()},
            "later_epochs": {k: later(v, "epoch_seconds") for k, v in cells.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fashion", type=Path, default=HERE.parent.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--celeba", type=Path, default=Path("/work/runs/celeba_full"),
                        help="a folder in CelebA's layout (benchmarks/celeba_full.py generates one)")
    parser.add_argument("--recipes", default="mnist,celeba")
    parser.add_argument("--positions", type=float, metavar="MINUTES",
                        help="measure positions inside epochs (train.checkpoint_minutes) instead of epoch checkpoints")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, for every run (data.train_size=2000)")
    args = parser.parse_args()
    if args.positions is not None and args.positions <= 0:
        parser.error(f"--positions {args.positions:g}: should be minutes between positions, more than 0, like 0.05")
    if args.positions:
        variants = {"on": [f"train.checkpoint_minutes={args.positions:g}"], "off": ["train.checkpoint_minutes=0"]}
        row_of = position_row
    else:
        variants = {every: [f"train.checkpoint_every={every}"] for every in (1, 1000)}  # each epoch uploaded, the last
        row_of = epoch_checkpoint_row
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnflow-upload-") as temporary:
        root = Path(temporary)
        server, server_uri = tracking_server(root / "server")
        try:
            for recipe in args.recipes.split(","):
                for store, uri in (("local SQLite", f"sqlite:///{root / recipe / 'mlflow.db'}"), ("tracking server", server_uri)):
                    cells, server_cpu = {}, {}
                    for name, extra in variants.items():
                        before = cpu_seconds(server.pid)
                        overrides = [*RECIPES[recipe](args), f"train.epochs={args.epochs}", *extra, *args.overrides]
                        cells[name] = trained(overrides, uri, root / recipe / store.split()[0] / str(name))
                        server_cpu[name] = cpu_seconds(server.pid) - before
                    first, second = variants
                    on_server = server_cpu[first] - server_cpu[second] if uri == server_uri else 0.0
                    rows.append({"recipe": recipe, "store": store, "precision": cells[first]["precision"],
                                 **row_of(cells, on_server)})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.terminate()
    (positions_table if args.positions else epoch_checkpoint_table)(rows)
    (HERE / "results").mkdir(exist_ok=True)
    name = "position_upload" if args.positions else "checkpoint_upload"
    (HERE / "results" / f"{name}.json").write_text(json.dumps(rows, indent=1))


def epoch_checkpoint_table(rows: list[dict]) -> None:
    print("\n| recipe | store | epoch | waited for | upload (background) | its CPU | server CPU | cost | later epochs: every epoch / last only |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        epochs = " / ".join(", ".join(f"{v:.1f}" for v in row["later_epochs"][k]) for k in ("1", "1000"))
        print(f"| {row['recipe']} ({row['precision']}) | {row['store']} | {row['epoch']:.1f} s | {row['stage']:.2f} s | "
              f"{row['upload_wall']:.2f} s | {row['upload_cpu']:.2f} s | {row['server_cpu']:.2f} s | "
              f"{row['cost_percent']:.1f}% | {epochs} s |")


def positions_table(rows: list[dict]) -> None:
    print("\n| recipe | store | epoch | epoch CPU s | positions | waited | writer CPU | upload CPU | server CPU | cost / epoch CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for number, epoch in enumerate(row["epochs"], start=2):
            print(f"| {row['recipe']} ({row['precision']}) | {row['store']} | {number} | {epoch['cpu']:.2f} | "
                  f"{epoch['positions']:.0f} | {epoch['waited']:.2f} s | {epoch['write_cpu']:.2f} s | "
                  f"{epoch['upload_cpu']:.2f} s | {epoch['server_cpu']:.2f} s | {epoch['cost_percent']:.1f}% |")
        print(f"| | | later epochs' CPU s, positions on / off: "
              f"{', '.join(f'{v:.1f}' for v in row['later_epoch_cpu']['on'])} / "
              f"{', '.join(f'{v:.1f}' for v in row['later_epoch_cpu']['off'])} | | | | | | |")


if __name__ == "__main__":
    main()
