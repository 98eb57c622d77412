"""Does the CelebA input pipeline keep up with training? Measured in one process, one sitting:

1. input pipeline alone, first pass (read + decode + augment every image, filling the cache),
2. input pipeline alone, cached pass (decoded images from memory, random augmentation in parallel),
3. the model's training step alone, on batches already in memory (what training needs per second),
4. a real epoch of `model.fit` on the pipeline (both together).

    python benchmarks/celeba_input.py /path/to/celeba [--images 16000] [--repeats 3]

The folder is CelebA's native layout (generated fixtures: cnnflow.components.data.celeba_layout). Times on a shared
2-core machine are noisy: each figure is the median of --repeats runs. Results also go to JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def images_per_second(dataset, batches: int | None = None) -> float:
    started, seen = time.perf_counter(), 0
    for images, _ in dataset.take(batches) if batches else dataset:
        seen += int(images.shape[0])
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=16000, help="training subset size (data.train_size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/celeba_input.json"))
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from cnnflow.components import registry
    from cnnflow.components.data import make_dataset, make_split
    from cnnflow.flows.setup.config import compose_config

    cfg = compose_config("celeba", [f"data.path={args.folder}", f"data.train_size={args.images}"])
    data = cfg["data"]
    split = make_split(data, cfg["seed"])
    dataset = make_dataset(data, split, "train", cfg["seed"])

    first_pass = images_per_second(dataset)  # fills the cache of decoded images
    cached = [images_per_second(dataset) for _ in range(args.repeats)]

    model = registry.build("model", cfg["model"], input_shape=(64, 64, 3), num_classes=2)
    model.compile(optimizer="adam", loss=keras.losses.BinaryCrossentropy(from_logits=True))
    batch = data["batch_size"]
    steps = 150
    in_memory = tf.data.Dataset.from_tensor_slices(
        (np.random.default_rng(0).random((batch * steps, 64, 64, 3), dtype=np.float32), np.zeros(batch * steps))
    ).batch(batch).cache()
    model.fit(in_memory, verbose=0, shuffle=False)  # trace, compile and fill the cache once
    model_only = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        model.fit(in_memory, verbose=0, shuffle=False)
        model_only.append(batch * steps / (time.perf_counter() - started))
    started = time.perf_counter()
    model.fit(dataset, verbose=0, shuffle=False)
    epoch_seconds = time.perf_counter() - started

    results = {
        "train_images": len(split.indices["train"]),
        "pipeline_first_pass_images_per_s": first_pass,
        "pipeline_cached_images_per_s": statistics.median(cached),
        "model_train_step_images_per_s": statistics.median(model_only),
        "fit_epoch_seconds": epoch_seconds,
        "fit_images_per_s": len(split.indices["train"]) / epoch_seconds,
        "repeats": args.repeats,
    }
    print(f"{'measure':<42}{'images/s':>12}")
    for key in ("pipeline_first_pass_images_per_s", "pipeline_cached_images_per_s", "model_train_step_images_per_s",
                "fit_images_per_s"):
        print(f"{key:<42}{results[key]:>12.0f}")
    print(f"pipeline (cached) / model step ratio: {results['pipeline_cached_images_per_s'] / results['model_train_step_images_per_s']:.1f}x; "
          f"one epoch of {results['train_images']} images: {epoch_seconds:.1f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
