"""Every cnnflow workload next to a plain Keras script of it, measured in one sitting on this machine.

    python benchmarks/run.py --mnist ../shared/data/fashion-mnist [--celeba DIR] [--repeats 2]

Workloads (each skipped when its data is not given, except CelebA, see below):
- mnist: the chapter's MNIST recipe (batch 64) on 20,000 + 10,000 IDX images (MNIST or Fashion-MNIST),
  vs benchmarks/plain_mnist.py;
- celeba: the chapter's CelebA recipe (batch 32, 16,000 + 1,000 faces, random crop + flip) vs
  benchmarks/plain_celeba.py, which decodes and augments every image every epoch as the chapter does.
  Without --celeba, 16,000 + 1,000 + 2,000 generated faces in CelebA's layout are made first
  (cnnflow.components.data.celeba_layout, about 40 s);
- fast: the fast recipe (experiment=fashion_mnist_fast) trained in full for --seeds seeds, with its
  test accuracy and the wall time of the whole command (no plain script of it exists to compare).

The plain script and `cnnflow train` run alternately as separate processes, same model, data, batch
size and steps. Every row names its precision, and like is compared with like first: the plain
script (float32) against cnnflow in float32; then cnnflow in `auto` precision (the recipes' default:
measured in this sitting's first auto run, with XDG_CACHE_HOME in a temporary folder) as a row of its
own, so what bfloat16 adds is not mistaken for what cnnflow adds; a line after the table says what
auto chose and why, and the CPU model heads the table. The auto run that measured its precision is
left out of the start-up median. The table shows training images/s (median of the epochs after the first, when
caches are warm; the first epoch separately), the epoch time as median (min-max), the throughput
ratio to the plain script as a median with its range over the epochs paired in alternation, the
achieved FLOP/s as a fraction of this machine's fp32 matmul peak measured in this run, and seconds
from process start to the first training step, and the CPU seconds of an epoch (all threads), which a
shared CPU quota does not blur as it blurs wall time. `--checkpoint-minutes M` adds a float32 row
keeping its position inside epochs every M minutes (train.checkpoint_minutes). The defaults (3 repeats x 3 epochs) give 6 later
epochs per side; the whole run takes about 45 minutes here (mnist ~12, celeba ~27 with generating
the faces, fast ~6).
Results also go to benchmarks/results/run.json. These 2-core machines are noisy: only ratios
measured in one sitting mean anything, and their range says how much.
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
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass
class Workload:
    name: str
    plain_script: str
    plain_args: list[str]
    overrides: list[str]
    train_images: int  # per epoch
    valid_images: int  # per epoch, a forward pass each
    flops_per_train_image: float  # forward + backward
    variants: dict[str, list[str]] | None = None  # extra cnnflow runs: label -> overrides


# cnnflow's runs of a workload: float32 first (the plain scripts' precision), then the recipe's own
# `auto`; the label gets the precision `auto` resolved to, read from the run.
LIKE_FOR_LIKE = {"cnnflow": ["runtime.precision=float32"], "cnnflow auto": ["runtime.precision=auto"]}


def mnist_workload(folder: Path, train_size: int = 20000) -> Workload:
    conv1, conv2 = 28 * 28 * 32 * 5 * 5 * 1, 14 * 14 * 64 * 5 * 5 * 32
    dense = 7 * 7 * 64 * 1024 + 1024 * 10
    return Workload("mnist", "plain_mnist.py", [str(folder), "--train-size", str(train_size)],
                    ["experiment=fashion_mnist", "data.source=idx", f"data.path={folder}",
                     f"data.train_size={train_size}"], train_size, 10000, 2 * 3 * (conv1 + conv2 + dense),
                    LIKE_FOR_LIKE)


def celeba_workload(folder: Path, train_size: int = 16000) -> Workload:
    macs = 64 * 64 * 32 * 27 + 32 * 32 * 64 * 9 * 32 + 16 * 16 * 128 * 9 * 64 + 8 * 8 * 256 * 9 * 128 + 256
    return Workload("celeba", "plain_celeba.py", [str(folder), "--train-size", str(train_size)],
                    ["experiment=celeba", f"data.path={folder}", f"data.train_size={train_size}"],
                    train_size, 1000, 2 * 3 * macs, LIKE_FOR_LIKE)


def matmul_peak_flops(size: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of a large matrix product: the practical peak of this CPU for dense math."""
    import tensorflow as tf

    a, b = tf.random.normal((size, size)), tf.random.normal((size, size))
    tf.linalg.matmul(a, b).numpy()  # warm up
    started = time.perf_counter()
    for _ in range(repeats):
        tf.linalg.matmul(a, b).numpy()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def plain(workload: Workload, epochs: int) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, str(HERE / workload.plain_script), *workload.plain_args,
                          "--epochs", str(epochs)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"wall_seconds": time.time() - started}


def cnnflow_train(overrides: list[str], workdir: Path, env: dict[str, str] | None = None, launcher: list[str] = (),
                  python: str = sys.executable):
    """`cnnflow train OVERRIDES` in a new process with its own MLflow store (started through
    `launcher`, a command that runs the one after it; `python`: the installation that runs it);
    returns its finished run."""
    from mlflow import MlflowClient

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    out = subprocess.run([*launcher, python, "-m", "cnnflow.flows.cli", "train", *overrides], cwd=workdir,
                         env=dict(env or os.environ, MLFLOW_TRACKING_URI=store), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"cnnflow train {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    client = MlflowClient(tracking_uri=store)
    return client, client.get_run(out.stderr.split("done: run ")[-1].split(",")[0].strip())


def cnnflow(workload: Workload, epochs: int, workdir: Path, extra: list[str] = ()) -> dict:
    started = time.time()
    client, run = cnnflow_train([*workload.overrides, *extra, f"train.epochs={epochs}", "plots=none"], workdir)
    def per_epoch(metric):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]

    why = run.data.params.get("precision.why", "")
    return {"epoch_seconds": per_epoch("epoch_seconds"), "epoch_cpu_seconds": per_epoch("epoch_cpu_seconds"),
            "startup_seconds": run.data.metrics["startup_seconds"], "wall_seconds": time.time() - started,
            "precision": run.data.tags["precision"], "precision_why": why, "calibrated": "measured now" in why,
            "cpu": run.data.tags.get("env.cpu", "?")}


def summarize(workload: Workload, results: list[dict], peak: float, plain_results: list[dict]) -> dict:
    epochs = [s for r in results for s in r["epoch_seconds"][1:]]
    later = statistics.median(epochs)
    # epoch k of repeat r against the plain script's epoch k of repeat r: they ran next to each other
    def paired(seconds: str) -> list[float]:
        return [p / s for mine, theirs in zip(results, plain_results)
                for s, p in zip(mine[seconds][1:], theirs[seconds][1:])]

    cpu = [s for r in results for s in r["epoch_cpu_seconds"][1:]]
    return {
        "precision": results[0].get("precision", "float32"),
        "images_per_s": (workload.train_images + workload.valid_images) / later,
        "first_epoch_seconds": statistics.median(r["epoch_seconds"][0] for r in results),
        "later_epoch_seconds": later,
        "later_epoch_range": [min(epochs), max(epochs)],
        "later_epochs": len(epochs),
        "ratio": statistics.median(p for r in plain_results for p in r["epoch_seconds"][1:]) / later,
        "ratio_range": [min(paired("epoch_seconds")), max(paired("epoch_seconds"))],
        "paired_ratio": statistics.median(paired("epoch_seconds")),
        "later_epoch_cpu_seconds": statistics.median(cpu),
        "cpu_ratio": statistics.median(paired("epoch_cpu_seconds")),  # the plain script's CPU seconds / this row's
        "cpu_ratio_range": [min(paired("epoch_cpu_seconds")), max(paired("epoch_cpu_seconds"))],
        # Validation images cost a forward pass only; count FLOPs of the training images.
        "peak_fraction": workload.flops_per_train_image * workload.train_images / later / peak,
        # the run that measured auto's precision (once per machine) starts later by that: left out
        "startup_seconds": statistics.median([r["startup_seconds"] for r in results if not r.get("calibrated")]
                                             or [r["startup_seconds"] for r in results]),
        "precision_why": next((r["precision_why"] for r in results if r.get("precision_why")), ""),
        "wall_seconds": statistics.median(r["wall_seconds"] for r in results),
    }


def fast_recipe(folder: Path, seeds: list[int], workdir: Path) -> list[dict]:
    runs = []
    for seed in seeds:
        started = time.time()
        client, run = cnnflow_train(["experiment=fashion_mnist_fast", "data.source=idx", f"data.path={folder}",
                                     f"seed={seed}", "plots=none"], workdir)
        epochs = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
        runs.append({"seed": seed, "test_accuracy": run.data.metrics["test_accuracy"],
                     "wall_seconds": time.time() - started,
                     "later_epoch_seconds": statistics.median(m.value for m in epochs[1:])})
        print(f"fast recipe seed {seed}: {runs[-1]['test_accuracy']:.2%} in {runs[-1]['wall_seconds']:.0f} s",
              file=sys.stderr, flush=True)
    return runs


def generated_celeba(folder: Path) -> Path:
    print("generating 16,000 + 1,000 + 2,000 faces in CelebA's layout ...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "cnnflow.components.data.celeba_layout", str(folder), "--train", "16000",
                    "--valid", "1000", "--test", "2000"], check=True, capture_output=True)
    return folder


def print_table(summary: dict, peak: float, args) -> None:
    print(f"CPU: {cpu_model()}; fp32 matmul peak here: {peak / 1e9:.0f} GFLOP/s; {args.repeats} alternating repeats "
          f"x {args.epochs} epochs; images/s = (train + valid) images / median epoch after the first")
    print(f"{'workload':<9}{'':<30}{'images/s':>9}{'ratio (range)':>18}{'of peak':>9}{'1st epoch':>11}"
          f"{'later epochs: median (min-max), n':>36}{'start->1st step':>17}{'CPU s/epoch (ratio)':>22}")
    print("  (ratio: the plain script's median later epoch / this row's, range over the epochs paired in "
          "alternation; over 1 is faster. CPU: median CPU seconds of all threads per later epoch, and the paired "
          "median of the plain script's / this row's)")
    for name, sides in summary.items():
        for side, s in sides.items():
            label = f"{side} ({s['precision']})" if side != "plain" else "plain Keras (float32)"
            low, high = s["ratio_range"]
            shown = f"{s['ratio']:.2f} ({low:.2f}-{high:.2f})" if side != "plain" else ""
            lo, hi = s["later_epoch_range"]
            later = f"{s['later_epoch_seconds']:.1f} s ({lo:.1f}-{hi:.1f}), {s['later_epochs']}"
            print(f"{name if side == 'plain' else '':<9}{label:<30}{s['images_per_s']:>9.0f}{shown:>18}"
                  f"{s['peak_fraction']:>9.1%}{s['first_epoch_seconds']:>10.1f}s{later:>36}"
                  f"{s['startup_seconds']:>16.1f}s"
                  f"{s['later_epoch_cpu_seconds']:>14.1f}" + (f" ({s['cpu_ratio']:.2f})" if side != "plain" else ""))
    for name, sides in summary.items():
        for side, s in sides.items():
            if side == "cnnflow auto":  # the default: what auto chose here, and why
                print(f"{name}: the default (runtime.precision=auto) trained in {s['precision']}: {s['precision_why']}; "
                      f"paired median {s['paired_ratio']:.2f} of the plain script's speed in wall time, "
                      f"{s['cpu_ratio']:.2f} in CPU seconds")


def cpu_model() -> str:
    from cnnflow.flows.setup import runtime

    machine = runtime.fingerprint()
    return f"{machine['cpu']} ({machine['cpu_flags']})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist", type=Path, help="IDX files of MNIST or Fashion-MNIST (mnist and fast workloads)")
    parser.add_argument("--celeba", type=Path, help="CelebA's native layout; default: generated faces")
    parser.add_argument("--workloads", nargs="+", default=["mnist", "celeba", "fast"], choices=["mnist", "celeba", "fast"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="fast recipe seeds")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "run.json")
    parser.add_argument("--checkpoint-minutes", type=float, help="also run cnnflow in float32 keeping its position "
                        "inside epochs this often (train.checkpoint_minutes), to measure what that costs")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be 2 or more: the first epoch (tracing, filling caches) is reported apart")
    if args.mnist is None and {"mnist", "fast"} & set(args.workloads):
        print("no --mnist folder: skipping the mnist and fast workloads", file=sys.stderr)
        args.workloads = [w for w in args.workloads if w == "celeba"]
    peak = matmul_peak_flops()
    summary, runs, fast = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        # auto measures its precision in this sitting (its first run), not reads what another one kept
        os.environ["XDG_CACHE_HOME"] = str(workdir / "cache")
        workloads = []
        if "mnist" in args.workloads:
            workloads.append(mnist_workload(args.mnist.resolve()))
        if "celeba" in args.workloads:
            workloads.append(celeba_workload((args.celeba or generated_celeba(workdir / "celeba")).resolve()))
        for workload in workloads:
            variants = dict(workload.variants or {"cnnflow": []})
            if args.checkpoint_minutes:
                variants["cnnflow positions"] = [*variants.get("cnnflow", []),
                                                 f"train.checkpoint_minutes={args.checkpoint_minutes}"]
            runs[workload.name] = {"plain": [], **{label: [] for label in variants}}
            for repeat in range(args.repeats):  # alternate, so drifts of the machine hit all alike
                runs[workload.name]["plain"].append(plain(workload, args.epochs))
                for label, extra in variants.items():
                    runs[workload.name][label].append(cnnflow(workload, args.epochs, workdir, extra))
                print(f"{workload.name}: repeat {repeat + 1}/{args.repeats} done", file=sys.stderr, flush=True)
            summary[workload.name] = {side: summarize(workload, results, peak, runs[workload.name]["plain"])
                                      for side, results in runs[workload.name].items()}
        if "fast" in args.workloads:
            fast = fast_recipe(args.mnist.resolve(), args.seeds, workdir)
    print_table(summary, peak, args)
    for run in fast:
        print(f"fast recipe (experiment=fashion_mnist_fast) seed {run['seed']}: test accuracy "
              f"{run['test_accuracy']:.2%}, whole command {run['wall_seconds']:.0f} s, "
              f"later epochs {run['later_epoch_seconds']:.1f} s (median)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "peak_flops": peak, "runs": runs, "fast_recipe": fast,
                                     "epochs": args.epochs, "repeats": args.repeats}, indent=2))


if __name__ == "__main__":
    main()
