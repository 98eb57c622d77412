"""A real training killed mid-epoch and resumed, against the same training never stopped
(benchmarks/LOG.md: "Killed and resumed, to the last digit").

    python benchmarks/resume.py --data ../shared/data/mnist-test
    python benchmarks/resume.py --data ../shared/data/mnist-test --precision auto    # bfloat16 here
    python benchmarks/resume.py --data ../shared/data/mnist-test --checkpoint-minutes 0.05  # positions every 3 s
    python benchmarks/resume.py --data ../shared/data/mnist-test --checkpoint-minutes 0.05 --another-machine

Runs `cnnflow train experiment=mnist_small data.path=DATA runtime.precision=P` three times, each
folder with its own MLflow store: once to the end; once killed with kill -9 when the progress line
of epoch 2 shows half its steps done; then the same command again, which resumes the killed run
from its last checkpoint (with --checkpoint-minutes, a position inside epoch 2; with --another-machine
its run folder is deleted first, so the checkpoint comes from the run's artifact store). Prints where it
resumed, every epoch's metrics of both, the test accuracy, a hash of the
final weights, and whether all of it is equal; JSON to benchmarks/results/.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # this process loads the two models


def command(data: Path, experiment: str, precision: str) -> list[str]:
    return [sys.executable, "-m", "cnnflow.flows.cli", "train", f"experiment={experiment}", "data.source=idx",
            f"data.path={data.resolve()}", f"runtime.precision={precision}", "plots=none"]


def started(args: list[str], folder: Path) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder.resolve() / 'mlflow.db'}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PREFECT_API_URL", None)  # the flow runs in process, as on a laptop
    return subprocess.Popen(args, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finished(args: list[str], folder: Path) -> None:
    process = started(args, folder)
    out, _ = process.communicate()
    (folder / "train.log").open("a").write(out)
    if process.returncode:
        raise SystemExit(f"{' '.join(args)} failed (exit {process.returncode}); see {folder / 'train.log'}")


def killed_mid_epoch(args: list[str], folder: Path, epoch: int) -> str:
    """The command, killed with kill -9 once epoch `epoch` is half done; the progress line it died after."""
    process = started(args, folder)
    halfway = re.compile(rf"epoch {epoch}/\d+\s+(\d+)%")
    last = ""
    with (folder / "train.log").open("a") as log:
        for line in process.stdout:
            log.write(line)
            last = line.strip() or last
            found = halfway.search(line)
            if found and int(found.group(1)) >= 50:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return line.strip()
    raise SystemExit(f"the training ended (exit {process.wait()}) before epoch {epoch} was half done: {last}")


def result(folder: Path) -> dict:
    """Every epoch's metrics, the test metrics and a hash of the final weights of the folder's one run."""
    import keras
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder.resolve() / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()], filter_string="tags.output_dir != ''")
    if run.info.status != "FINISHED":
        return {"run": run.info.run_id, "status": run.info.status}
    curves = {name: [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]
              for name in METRICS}
    weights = keras.models.load_model(Path(run.data.tags["output_dir"]) / "model.keras").get_weights()
    digest = hashlib.sha256(b"".join(w.tobytes() for w in weights)).hexdigest()
    return {"run": run.info.run_id, "status": run.info.status, "curves": curves, "weights_sha256": digest,
            "test_accuracy": run.data.metrics["test_accuracy"], "test_loss": run.data.metrics["test_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="an MNIST IDX folder (../shared/data/mnist-test)")
    parser.add_argument("--experiment", default="mnist_small")
    parser.add_argument("--precision", default="float32", help="float32 | auto | mixed_bfloat16")
    parser.add_argument("--kill-in-epoch", type=int, default=2)
    parser.add_argument("--folder", type=Path, default=Path("runs/resume"))
    parser.add_argument("--checkpoint-minutes", type=float, help="train.checkpoint_minutes (default: the recipe's, 10)")
    parser.add_argument("--another-machine", action="store_true",
                        help="delete the killed run's folder before resuming: only the MLflow store has its checkpoints")
    args = parser.parse_args()
    train = command(args.data, args.experiment, args.precision)
    label = args.precision
    if args.checkpoint_minutes is not None:
        train.append(f"train.checkpoint_minutes={args.checkpoint_minutes:g}")
        label += f"-positions-{args.checkpoint_minutes:g}"
    elsewhere = "-resumed-elsewhere" if args.another_machine else ""
    never, stopped = args.folder / f"{label}-never-stopped", args.folder / f"{label}-killed{elsewhere}"
    # this script stopped half-way and run again: a started run is resumed by the same command
    if not (stopped / "mlflow.db").exists():
        print("killed after:", killed_mid_epoch(train, stopped, args.kill_in_epoch), flush=True)
        if args.another_machine:
            shutil.rmtree(stopped / "outputs")  # the run folders, checkpoints and positions: the machine is gone
    for folder in (never, stopped):
        if not (folder / "mlflow.db").exists() or result(folder)["status"] != "FINISHED":
            finished(train, folder)  # the same command again: it resumes the killed run
    a, b = result(never), result(stopped)
    print(next((line[line.index("resuming"):].split(";")[0] for line in (stopped / "train.log").read_text().splitlines()
                if "resuming MLflow run" in line), "the killed run was not resumed"))
    for name in METRICS:
        print(f"{name:>12}  never stopped {' '.join(f'{v:.6f}' for v in a['curves'][name])}")
        print(f"{'':>12}  killed, resumed {' '.join(f'{v:.6f}' for v in b['curves'][name])}")
    print(f"test accuracy {a['test_accuracy']:.4f} / {b['test_accuracy']:.4f}, test loss {a['test_loss']:.6f} / "
          f"{b['test_loss']:.6f}; weights {a['weights_sha256'][:16]} / {b['weights_sha256'][:16]}")
    same = all(a[key] == b[key] for key in ("curves", "weights_sha256", "test_accuracy", "test_loss"))
    print("equal to the last bit" if same else "NOT equal")
    out = Path(__file__).parent / "results" / f"resume-{label}{elsewhere}-{date.today()}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(train[2:]), "never_stopped": a, "killed_and_resumed": b,
                               "equal": same}, indent=1))
    print("written:", out)


if __name__ == "__main__":
    main()
