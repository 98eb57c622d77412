"""What each `runtime.*` setting (and a doubled batch) does to the training step of each model here.

    python benchmarks/settings.py [--repeats 2] [--steps 40]

Every (model, setting) pair runs in a fresh process, because TensorFlow reads threads and oneDNN
once at start-up: the process applies the setting the way a cnnflow training does
(cnnflow.flows.setup.runtime), builds the registered model, compiles it, warms up, then times `--steps`
training steps (repeated for at least --min-seconds) on batches already in memory, so only the model
step is measured. The settings
alternate within each repeat so drifts of this shared machine hit all of them alike; the table
shows the median images/s and the ratio to the default settings. Results also go to JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {  # model -> (input shape, classes, the chapter's batch size)
    "mnist_cnn": ((28, 28, 1), 10, 64),
    "celeba_cnn": ((64, 64, 3), 2, 32),
    "fast_cnn": ((28, 28, 1), 10, 128),
}
DEFAULTS = {"precision": "float32", "jit_compile": False, "intra_op_threads": None, "inter_op_threads": None,
            "onednn": True}
SETTINGS = {  # label -> changes to the default runtime settings (batch_scale is not a runtime setting)
    "default": {},
    "mixed_bfloat16": {"precision": "mixed_bfloat16"},
    "jit_compile (XLA)": {"jit_compile": True},
    "oneDNN off": {"onednn": False},
    "1 intra-op thread": {"intra_op_threads": 1},
    "batch x2": {"batch_scale": 2},
}


def measure(model_name: str, setting: dict, steps: int, min_seconds: float) -> float:
    """Training-step images/s of one model under one setting; runs inside the fresh process."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cnnflow.components import registry
    from cnnflow.flows.setup import runtime

    shape, classes, batch = MODELS[model_name]
    batch *= setting.get("batch_scale", 1)
    settings = DEFAULTS | {k: v for k, v in setting.items() if k != "batch_scale"}
    runtime.set_precision(settings)
    model = registry.build("model", {"name": model_name}, input_shape=shape, num_classes=classes)
    binary = classes == 2 and model.output_shape[-1] == 1
    loss = keras.losses.BinaryCrossentropy(from_logits=True) if binary else "sparse_categorical_crossentropy"
    model.compile(optimizer="adam", loss=loss, jit_compile=settings["jit_compile"])
    rng = np.random.default_rng(0)
    images = rng.random((batch * steps, *shape), dtype=np.float32)
    labels = rng.integers(0, classes if not binary else 2, batch * steps).astype("float32" if binary else "int32")
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch).cache()
    model.fit(batches, verbose=0)  # trace (and XLA-compile) once, fill the cache
    # This machine's speed jumps over seconds (a shared CPU quota): time whole passes for >= min_seconds.
    started, images = time.perf_counter(), 0
    while time.perf_counter() - started < min_seconds:
        model.fit(batches, verbose=0)
        images += batch * steps
    return images / (time.perf_counter() - started)


def in_fresh_process(model_name: str, label: str, steps: int, min_seconds: float) -> float:
    from cnnflow.flows.setup import runtime

    setting = SETTINGS[label]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    for name in runtime.environment(DEFAULTS):
        env.pop(name, None)
    env |= runtime.environment(DEFAULTS | {k: v for k, v in setting.items() if k != "batch_scale"})
    out = subprocess.run([sys.executable, __file__, "--child", model_name, label, "--steps", str(steps),
                          "--min-seconds", str(min_seconds)],
                         env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--min-seconds", type=float, default=10.0, help="time passes of --steps for at least this")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--json", type=Path, default=HERE / "results" / "settings.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child[0], SETTINGS[args.child[1]], args.steps, args.min_seconds))
        return
    samples: dict[str, dict[str, list[float]]] = {m: {label: [] for label in SETTINGS} for m in args.models}
    for repeat in range(args.repeats):
        for model_name in args.models:
            for label in SETTINGS:
                samples[model_name][label].append(in_fresh_process(model_name, label, args.steps,
                                                                                  args.min_seconds))
                print(f"repeat {repeat + 1}/{args.repeats} {model_name:<11} {label:<18} "
                      f"{samples[model_name][label][-1]:>7.0f} images/s", file=sys.stderr, flush=True)
    medians = {m: {label: statistics.median(values) for label, values in per.items()} for m, per in samples.items()}
    print(f"training-step images/s, median of {args.repeats} repeats of >= {args.min_seconds:.0f} s each "
          f"(ratio to default)")
    print(f"{'setting':<20}" + "".join(f"{m:>22}" for m in args.models))
    for label in SETTINGS:
        cells = "".join(f"{medians[m][label]:>13.0f} ({medians[m][label] / medians[m]['default']:>5.2f})"
                        for m in args.models)
        print(f"{label:<20}{cells}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"medians": medians, "samples": samples, "steps": args.steps}, indent=2))


if __name__ == "__main__":
    main()
