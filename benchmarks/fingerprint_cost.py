"""What a run's content fingerprints cost (components/data/fingerprint.py), against one epoch of the
same recipe: paid once per run, when the split is made (issue 36's bound: at most 5% of one epoch).

    python benchmarks/fingerprint_cost.py --fashion ../shared/data/fashion-mnist

prints the seconds to fingerprint every role (train, valid, test) of the fast recipe on full
Fashion-MNIST and of the CelebA recipe on 16,000 generated faces. It does not train: the epoch to
compare with is measured by benchmarks/run.py on the same machine (a ratio in one run is still to do).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def fingerprint_seconds(experiment: str, overrides: list[str]) -> tuple[float, dict[str, int]]:
    from cnnflow.components.data import fingerprinted, make_split
    from cnnflow.components.data import core
    from cnnflow.flows.config import compose_config

    data = compose_config(experiment, overrides)["data"]
    split = make_split(data, seed=1)
    core._fingerprints.clear()
    started = time.perf_counter()
    fingerprinted(data, split)
    return time.perf_counter() - started, split.sizes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fashion", required=True, help="the Fashion-MNIST IDX folder")
    parser.add_argument("--faces", type=int, default=16000, help="generated CelebA faces to fingerprint")
    args = parser.parse_args()
    seconds, sizes = fingerprint_seconds("fashion_mnist_fast", ["data.source=idx", f"data.path={args.fashion}",
                                                                 "data.train_size=full"])
    print(f"fashion_mnist_fast, full Fashion-MNIST {sizes}: fingerprints in {seconds:.2f} s")
    from cnnflow.components.data.celeba_layout import write_celeba

    with tempfile.TemporaryDirectory() as folder:
        faces = write_celeba(Path(folder), train=args.faces, valid=max(1, args.faces // 8), test=max(1, args.faces // 8))
        seconds, sizes = fingerprint_seconds("celeba", [f"data.path={faces}", f"data.train_size={args.faces}",
                                                        f"data.valid_size={max(1, args.faces // 8)}"])
        print(f"celeba, {args.faces} generated faces {sizes}: fingerprints in {seconds:.2f} s")


if __name__ == "__main__":
    main()
