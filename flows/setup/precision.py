"""`runtime.precision=auto`: the precision a training runs in, chosen by measuring, once per machine.

A mixed precision (bfloat16 math on a CPU, float16 on a GPU) is faster where the hardware computes
in it natively, and slower where it is emulated or where a model's small ops (batch norm) spend
their time converting. A CPU's flags do not tell which: with the same AVX512_BF16 flag, bfloat16
trained the MNIST recipe 1.43x faster on one CPU and 0.81x as fast on another (benchmarks/README.md).
So the first training of a model family on a machine times a few of its training steps in float32
and in the mixed candidate, alternately, and keeps the timings in the user's cache folder, per
machine (CPU or GPU, threads, TensorFlow and Keras versions: runtime.fingerprint), model, input
shape and batch size. The candidate is chosen only when it is clearly faster in wall and in CPU
time (CLEARLY_FASTER): float32 repeats a training to the bit, a mixed precision may not.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from cnnflow.flows.setup import runtime

CLEARLY_FASTER = 1.15  # in wall and in CPU time: float32's bit-exact repeats are worth more than a few percent
ROUNDS = 3  # windows per precision, alternating: these machines' speed jumps between phases for seconds
WINDOW_SECONDS = 0.25  # each window is at least this long, and at least MIN_STEPS steps
MIN_STEPS, MAX_STEPS = 3, 50
HOPELESS = 2.0  # a candidate this much slower on its first timed step is not timed further (emulated)


@dataclass(frozen=True)
class StepTime:
    wall: float  # seconds per training step, in the fastest window
    cpu: float  # CPU seconds of all threads per step, in that window


@dataclass(frozen=True)
class Choice:
    precision: str
    why: str  # one sentence: what was measured (or why nothing was)
    basis: str  # the same in a few words, for `cnnflow runs`: "auto 1.47x", "set", ...


def chosen(cfg: dict[str, Any], features: dict[str, Any], build: Callable[[], Any] | None) -> Choice:
    """The precision a new training of `cfg` runs in. `build()` makes the recipe's model, compiled,
    in Keras' current global policy."""
    setting = cfg["runtime"]["precision"]
    if setting != "auto":
        return Choice(setting, f"runtime.precision={setting}", "set")
    candidate = mixed_candidate()
    if candidate is None:
        return Choice("float32", "auto: this CPU has no bfloat16 units (its flags name neither avx512_bf16 nor "
                                 "amx_bf16)", "auto, no bf16 units")
    if not cfg["runtime"]["calibrate"]:
        return unmeasured(candidate)
    key = calibration_key(cfg, features)
    path = calibrations_folder() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    with _one_at_a_time(path):  # processes starting together measure once, and not against each other
        recorded = _recorded(path)
        if recorded:
            return decided(candidate, _times(recorded["timings"]), cfg["model"]["name"],
                           f"measured on {recorded['measured']} on this machine, kept in {path}")
        started = time.perf_counter()
        try:
            timings = step_times(build, ["float32", candidate], _batch(cfg, features))
        except CandidateFailed as failure:
            return Choice("float32", f"auto: {candidate} failed in a training step of {cfg['model']['name']} "
                                     f"({failure}); float32 it is", f"auto, {_short(candidate)} failed")
        spent = time.perf_counter() - started
        kept = _keep(path, {"key": key, "timings": {p: asdict(t) for p, t in timings.items()},
                            "measured": datetime.date.today().isoformat(), "seconds": round(spent, 2)})
    return decided(candidate, timings, cfg["model"]["name"], f"measured now in {spent:.1f} s, once: {kept}")


def mixed_candidate() -> str | None:
    """mixed_float16 where there is a GPU; mixed_bfloat16 on a CPU, unless its flags (Linux) say it
    has no bfloat16 units: emulated bfloat16 is slow, and not worth the seconds of measuring it."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    flags = runtime.cpu_flags()
    return None if flags is not None and not {"avx512_bf16", "amx_bf16"} & flags else "mixed_bfloat16"


def unmeasured(candidate: str) -> Choice:
    """runtime.calibrate=false: float32 on a CPU; on a GPU mixed_float16 where it has tensor cores
    (compute capability 7.0 or more), as the GPU makers advise."""
    if candidate == "mixed_float16":
        import tensorflow as tf

        gpu = tf.config.list_physical_devices("GPU")[0]
        capability = tuple(tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0))
        if capability >= (7, 0):
            return Choice("mixed_float16", "auto, runtime.calibrate=false: a GPU with tensor cores (compute capability "
                                           f"{capability[0]}.{capability[1]})", "auto, not measured")
    return Choice("float32", "auto, runtime.calibrate=false: float32 without measuring", "auto, not measured")


def decided(candidate: str, timings: dict[str, StepTime], model: str, provenance: str) -> Choice:
    """The candidate when it was clearly faster than float32 in wall and in CPU time, else float32."""
    base, other = timings["float32"], timings[candidate]
    wall, cpu = base.wall / other.wall, base.cpu / other.cpu
    measured = (f"{candidate} ran {model}'s training step at {wall:.2f}x float32's speed ({cpu:.2f}x in CPU time; "
                f"{other.wall * 1000:.0f} against {base.wall * 1000:.0f} ms)")
    if min(wall, cpu) >= CLEARLY_FASTER:
        return Choice(candidate, f"auto: {measured}; {provenance}", f"auto {wall:.2f}x")
    return Choice("float32", f"auto: {measured}, under the {CLEARLY_FASTER}x in both that would be worth float32's "
                             f"bit-exact repeats; {provenance}", f"auto, {_short(candidate)} {wall:.2f}x")


class CandidateFailed(Exception):
    """A mixed precision could not run the model (an op without a kernel for its type, say)."""


def step_times(build: Callable[[], Any], precisions: list[str], batch) -> dict[str, StepTime]:
    """Seconds per training step of the model `build` makes, in each precision (the first is the
    reference, float32): ROUNDS alternating windows each, the fastest window kept. Keras' state (its
    layer-name counters, its policy) is cleared afterwards, so the training's own model is built as
    in a process that never measured."""
    import keras

    x, y = batch
    models, first = {}, {}
    try:
        for precision in precisions:
            keras.mixed_precision.set_global_policy(precision)
            try:
                models[precision] = build()
                models[precision].train_on_batch(x, y)  # traces the step
                first[precision] = _timed(models[precision], x, y, 1).wall
            except Exception as error:
                if precision == precisions[0]:
                    raise  # the model fails in float32 too: its training says why, in context
                raise CandidateFailed(f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}") from None
            if first[precision] > HOPELESS * first[precisions[0]]:
                return {p: StepTime(t, t) for p, t in first.items()}  # emulated: not worth more seconds
        steps = {p: min(MAX_STEPS, max(MIN_STEPS, math.ceil(WINDOW_SECONDS / t))) for p, t in first.items()}
        best: dict[str, StepTime] = {}
        for _ in range(ROUNDS):
            for precision, model in models.items():
                window = _timed(model, x, y, steps[precision])
                if precision not in best or window.wall < best[precision].wall:
                    best[precision] = window
        return best
    finally:
        keras.backend.clear_session(free_memory=False)


def _timed(model, x, y, steps: int) -> StepTime:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        model.train_on_batch(x, y)  # returns numbers: the step has finished
    return StepTime((time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps)


def _batch(cfg: dict[str, Any], features: dict[str, Any]):
    """One batch of the training's shape: pixels in [0, 1] and labels of its classes."""
    import numpy as np

    rng = np.random.default_rng(0)
    size = cfg["data"]["batch_size"]
    return (rng.random((size, *features["input_shape"]), dtype=np.float32),
            rng.integers(0, features["num_classes"], size))


def calibration_key(cfg: dict[str, Any], features: dict[str, Any]) -> dict[str, str]:
    """What the measured speeds hold for: this machine and software (runtime.fingerprint), the model
    family and the shape of its steps."""
    return {**runtime.fingerprint(), "model": cfg["model"]["name"],
            "input_shape": "x".join(str(n) for n in features["input_shape"]), "batch_size": str(cfg["data"]["batch_size"]),
            "jit_compile": str(cfg["runtime"]["jit_compile"]), "deterministic": str(bool(cfg["train"].get("deterministic")))}


def calibrations_folder() -> Path:
    from cnnflow.components.data.caching import user_cache

    return user_cache() / "precision"


def _one_at_a_time(path: Path):
    """A lock beside the calibration, or none where its folder cannot be made (then it is not kept either)."""
    import contextlib

    from filelock import FileLock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(f"{path}.lock")
    except OSError:
        return contextlib.nullcontext()


def _recorded(path: Path) -> dict[str, Any] | None:
    """A calibration kept earlier, or None (none, or unreadable: measured again)."""
    try:
        recorded = json.loads(path.read_text())
        _times(recorded["timings"])
        return recorded
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _times(timings: dict[str, dict[str, float]]) -> dict[str, StepTime]:
    return {precision: StepTime(float(t["wall"]), float(t["cpu"])) for precision, t in timings.items()}


def _keep(path: Path, record: dict[str, Any]) -> str:
    """Writes the calibration whole (a reader sees the old file or the new one); says where, or why not."""
    from cnnflow.components.durable import write_durably

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durably(path, json.dumps(record, indent=2))  # its writers take turns (_one_at_a_time)
    except OSError as error:
        return f"not kept ({path.parent}: {error.strerror or error}), so measured again next time"
    return f"kept in {path}"


def _short(precision: str) -> str:
    return {"mixed_bfloat16": "bf16", "mixed_float16": "fp16"}.get(precision, precision)
