"""What a run's content fingerprints cost (components/data/fingerprint.py), as a share of one epoch
of the same run: paid once per run, when the split is made (issue 36's bound: at most 5%).

    python benchmarks/fingerprint_cost.py --fashion ../shared/data/fashion-mnist

Two `cnnflow train` runs of 2 epochs, each in its own process and store: the fast recipe on full
Fashion-MNIST (60,000 images: its epochs are the shortest, so the share is the largest), and the
CelebA recipe on 16,000 generated faces in CelebA's layout (JPEG files read and hashed). Each prints
the run's `fingerprint_seconds` metric against its own epochs (the later one, caches warm).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import cnnflow_train, generated_celeba  # noqa: E402


def share(label: str, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        client, run = cnnflow_train([*overrides, "train.epochs=2", "plots=none"], Path(workdir))
        epochs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"),
                                          key=lambda m: m.step)]
        seconds = run.data.metrics["fingerprint_seconds"]
        sizes = {role: run.data.tags[f"split.{role}_size"] for role in ("train", "valid", "test")}
        print(f"{label} {sizes}: fingerprints {seconds:.2f} s; epochs {epochs[0]:.1f} s, {epochs[-1]:.1f} s; "
              f"{100 * seconds / epochs[-1]:.1f}% of the later epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", required=True, help="the Fashion-MNIST IDX folder")
    args = parser.parse_args()
    share("fashion_mnist_fast, full Fashion-MNIST", ["experiment=fashion_mnist_fast", "data.source=idx",
                                                      f"data.path={Path(args.fashion).resolve()}", "data.train_size=full"])
    with tempfile.TemporaryDirectory() as folder:
        faces = generated_celeba(Path(folder))
        share("celeba, 16,000 generated faces", ["experiment=celeba", f"data.path={faces}", "data.train_size=16000",
                                                 "data.valid_size=1000"])


if __name__ == "__main__":
    main()
