"""What pruned search buys under a fixed epoch budget: TPE with Hyperband pruning against random
search, over several search seeds, on real Fashion-MNIST (benchmarks/README.md, "Search").

    python benchmarks/search.py --data ../shared/data/fashion-mnist --folder runs/search
    python benchmarks/search.py --data DIR --seeds 0 --samplers tpe      # one search

Each search is `cnnflow search experiment=fashion_mnist_fast search=fashion_mnist_fast` (the space
width 16-64, learning rate 1e-3 to 2e-2 on a log scale, batch 64/128/256; 45 epochs, the grid's
budget) in a folder of its own, so each has its own MLflow store and study; a search that was
stopped continues when the script runs again. Prints one row per search, then the median and range
of the best validation accuracy per sampler against the grid's 0.9268; JSON to benchmarks/results/.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

GRID_BEST = 0.9268  # benchmarks/LOG.md, "How the fast recipe was chosen": the 9-run grid under the same 45 epochs


def one_search(data: Path, folder: Path, sampler: str, seed: int, extra: list[str], pruner: str | None = None,
               experiment: str = "fashion_mnist_fast") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = [f"experiment={experiment}", *(["search=fashion_mnist_fast"] if experiment == "fashion_mnist_fast" else [])]
    command = [sys.executable, "-m", "cnnflow.flows.cli", "search", *recipe, "data.source=idx", f"data.path={data.resolve()}",
               f"search.sampler={sampler}", f"search.seed={seed}", *([f"search.pruner={pruner}"] if pruner else []),
               *extra]
    started = time.perf_counter()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder.resolve() / 'mlflow.db'}"}  # its own store
    with open(folder / "search.log", "a") as log:
        done = subprocess.run(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}); see {folder / 'search.log'}")
    return {"sampler": sampler, "pruner": pruner or "default", "seed": seed,
            "seconds": round(time.perf_counter() - started, 1), **summary(folder)}


def summary(folder: Path) -> dict:
    """The search's result, read back from its MLflow run (what the command printed, without parsing)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               filter_string="tags.`search.study` != ''")
    metrics = run.data.metrics
    trials = json.loads(Path(client.download_artifacts(run.info.run_id, "trials.json", str(folder))).read_text())
    rows = [dict(zip(trials["columns"], row)) for row in trials["data"]]
    pruned = [row["val_accuracy"] for row in rows if row["state"] == "pruned" and row["val_accuracy"] is not None]
    return {"best_val_accuracy": metrics["best_val_accuracy"], "best_test_accuracy": metrics["best_test_accuracy"],
            "trials": int(metrics["trials"]), "pruned": int(metrics["trials_pruned"]),
            "epochs_spent": int(metrics["epochs_spent"]), "best": run.data.tags["search.best_params"],
            "best_pruned": max(pruned, default=None)}  # a good trial stopped is what a person would not agree with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the Fashion-MNIST IDX folder")
    parser.add_argument("--folder", type=Path, default=Path("runs/search"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "random"], choices=["tpe", "random"])
    parser.add_argument("--experiment", default="fashion_mnist_fast",
                        help="the recipe searched (fashion_mnist_fast with its search file; another with the space "
                             "given after --)")
    parser.add_argument("--pruners", nargs="+", default=[None],
                        choices=["hyperband", "successive_halving", "median", "none"],
                        help="search.pruner of each search (default: the search file's)")
    parser.add_argument("extra", nargs="*", help="after --: more overrides for every search (tests shrink the data)")
    args = parser.parse_args()
    rows = []
    for sampler in args.samplers:
        for pruner in args.pruners:
            for seed in args.seeds:
                name = f"{sampler}-{seed}" + (f"-{pruner}" if pruner else "")
                row = one_search(args.data, args.folder / name, sampler, seed, args.extra, pruner, args.experiment)
                rows.append(row)
                print(f"{sampler:<6} {row['pruner']:<18} seed {seed}: best val {row['best_val_accuracy']:.4f} test "
                      f"{row['best_test_accuracy']:.4f}  {row['trials']} trials ({row['pruned']} pruned), "
                      f"{row['epochs_spent']} epochs, best pruned "
                      f"{row['best_pruned']}, {row['seconds'] / 60:.1f} min  [{row['best']}]", flush=True)
    for sampler, pruner in sorted({(r["sampler"], r["pruner"]) for r in rows}):
        values = [r["best_val_accuracy"] for r in rows if (r["sampler"], r["pruner"]) == (sampler, pruner)]
        print(f"{sampler} ({pruner} pruner): median best val {statistics.median(values):.4f} (range {min(values):.4f}-{max(values):.4f}) "
              f"over {len(values)} seeds; the grid: {GRID_BEST}")
    out = Path(__file__).parent / "results" / f"search-{args.folder.name}-{date.today()}.json"  # one file per set of searches
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"grid_best": GRID_BEST, "searches": rows}, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
