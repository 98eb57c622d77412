"""cnnflow vs a plain Keras script, measured in one sitting on this machine.

    python benchmarks/run.py ../shared/data/fashion-mnist [--train-size 20000] [--epochs 3] [--repeats 2]

For the chapter's MNIST recipe (same model, data, batch 64, steps and validation), alternately runs
the plain script (benchmarks/plain_mnist.py) and `cnnflow train` as separate processes, and prints:
training images/s of each (median over repeats of the epochs after the first), their ratio, the
achieved FLOP/s as a fraction of this machine's fp32 matmul peak (measured here, now), and the wall
time from command start to the first training step. Results also go to benchmarks/results/*.json.
Times on a shared 2-core machine are noisy: read the medians, and compare runs of one sitting.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of a large matrix product: the practical peak of this CPU for dense math."""
    import tensorflow as tf

    a, b = tf.random.normal((size, size)), tf.random.normal((size, size))
    tf.linalg.matmul(a, b).numpy()  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        tf.linalg.matmul(a, b).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def training_flops_per_image() -> float:
    """Multiply-adds of the chapter's MNIST CNN, x2 for FLOPs, x3 for forward + backward."""
    conv1 = 28 * 28 * 32 * 5 * 5 * 1
    conv2 = 14 * 14 * 64 * 5 * 5 * 32
    dense = 7 * 7 * 64 * 1024 + 1024 * 10
    return 2 * 3 * (conv1 + conv2 + dense)


def plain(folder: Path, train_size: int, epochs: int) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, str(HERE / "plain_mnist.py"), str(folder), "--train-size", str(train_size),
                          "--epochs", str(epochs)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {"wall_seconds": time.time() - started}


def cnnflow_train(overrides: list[str], workdir: Path, env: dict[str, str] | None = None):
    """`cnnflow train OVERRIDES` in a new process with its own MLflow store; returns its finished run."""
    from mlflow import MlflowClient

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    out = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", "train", *overrides], cwd=workdir,
                         env=dict(env or os.environ, MLFLOW_TRACKING_URI=store), capture_output=True, text=True,
                         check=True)
    client = MlflowClient(tracking_uri=store)
    return client, client.get_run(out.stderr.split("done: run ")[-1].split(",")[0].strip())


def cnnflow(folder: Path, train_size: int, epochs: int, workdir: Path) -> dict:
    started = time.time()
    client, run = cnnflow_train(["experiment=fashion_mnist", "data.source=idx", f"data.path={folder}",
                                 f"data.train_size={train_size}", f"train.epochs={epochs}", "plots={}"], workdir)
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
    return {"epoch_seconds": [m.value for m in history], "startup_seconds": run.data.metrics["startup_seconds"],
            "wall_seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="Fashion-MNIST (or MNIST) IDX files")
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=HERE / "results" / "mnist_overhead.json")
    args = parser.parse_args()
    folder = args.folder.resolve()
    peak = matmul_peak_flops()
    runs: dict[str, list[dict]] = {"plain": [], "cnnflow": []}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):  # alternate, so drifts of the machine hit both alike
            runs["plain"].append(plain(folder, args.train_size, args.epochs))
            runs["cnnflow"].append(cnnflow(folder, args.train_size, args.epochs, Path(workdir)))
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    images = args.train_size + 10000  # an epoch trains on train_size and validates on 10,000
    summary = {}
    for name, results in runs.items():
        later_epochs = [s for r in results for s in r["epoch_seconds"][1:]]
        summary[name] = {
            "images_per_s": images / statistics.median(later_epochs),
            "startup_seconds": statistics.median(r["startup_seconds"] for r in results),
            "wall_seconds": statistics.median(r["wall_seconds"] for r in results),
        }
        # Validation images cost a forward pass only; count FLOPs of the training images.
        summary[name]["peak_fraction"] = (training_flops_per_image() * args.train_size
                                          / statistics.median(later_epochs)) / peak
    ratio = summary["cnnflow"]["images_per_s"] / summary["plain"]["images_per_s"]
    print(f"fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s; {args.repeats} repeats x {args.epochs} epochs, "
          f"{args.train_size} train + 10000 valid images, medians of epochs 2..{args.epochs}")
    print(f"{'':<10}{'images/s':>10}{'of peak':>9}{'start->1st step':>17}{'wall':>8}")
    for name, s in summary.items():
        print(f"{name:<10}{s['images_per_s']:>10.0f}{s['peak_fraction']:>9.1%}{s['startup_seconds']:>15.1f} s"
              f"{s['wall_seconds']:>7.0f}s")
    print(f"throughput ratio cnnflow / plain: {ratio:.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "ratio": ratio, "peak_flops": peak, "runs": runs,
                                     "train_size": args.train_size, "epochs": args.epochs}, indent=2))


if __name__ == "__main__":
    main()
