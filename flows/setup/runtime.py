"""How TensorFlow runs a training: the `runtime.*` settings (conf/config.yaml).

Threads and oneDNN are read by TensorFlow once, when it starts, from environment variables; so
`use_environment` sets them before anything imports TensorFlow (the flows call it right after
composing the config) and warns when TensorFlow already runs with other values (a served process
that trained before: the settings then take effect in a new process). Precision and XLA are Keras
settings and apply per model. What each setting gave on this CPU: benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import sys
import threading
from typing import Any

_ENVIRONMENT = {"onednn": "TF_ENABLE_ONEDNN_OPTS", "intra_op_threads": "TF_NUM_INTRAOP_THREADS",
                "inter_op_threads": "TF_NUM_INTEROP_THREADS"}


def environment(runtime: dict[str, Any]) -> dict[str, str]:
    """The environment variables TensorFlow reads at start-up for these settings."""
    wanted = {_ENVIRONMENT["onednn"]: "1" if runtime["onednn"] else "0"}
    for key in ("intra_op_threads", "inter_op_threads"):
        if runtime[key]:
            wanted[_ENVIRONMENT[key]] = str(runtime[key])
    return wanted


def use_environment(runtime: dict[str, Any], logger: logging.Logger | logging.LoggerAdapter | None = None) -> None:
    """`runtime` comes from compose_config, whose schema has checked it."""
    wanted = environment(runtime)
    if "tensorflow" not in sys.modules:
        os.environ.update(wanted)
        return
    unset_default = {_ENVIRONMENT["onednn"]: "1"}  # TensorFlow's default when the variable is not set
    stale = {name: value for name, value in wanted.items()
             if os.environ.get(name, unset_default.get(name)) != value}
    if stale and logger:
        logger.warning(f"TensorFlow already runs in this process; {', '.join(f'{k}={v}' for k, v in stale.items())} "
                       f"takes effect in a new process only")


def cpu_flags() -> set[str] | None:
    """The first CPU's feature flags, where the system says (Linux's /proc/cpuinfo), else None."""
    flags = _cpuinfo("flags")
    return set(flags.split()) if flags else None


def _cpuinfo(field: str) -> str:
    """A field of the first CPU in /proc/cpuinfo (Linux), or '' where there is none."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((line for line in cpuinfo if line.split(":")[0].strip() == field), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


# The CPU features whose kernels TensorFlow and oneDNN choose between: a different set, other sums.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                 "amx_int8")


def fingerprint() -> dict[str, str]:
    """What decides a training's last bits besides its settings and data: the CPU and its vector
    units, the threads, oneDNN, the library versions and the devices. A run records it when it starts."""
    import keras
    import tensorflow as tf

    flags = _cpuinfo("flags").split()
    threading = tf.config.threading
    return {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
            "cpu_flags": " ".join(flag for flag in _VECTOR_FLAGS if flag in flags) or "none",
            "cpus": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
            "threads": f"intra {threading.get_intra_op_parallelism_threads() or 'default'}, "
                       f"inter {threading.get_inter_op_parallelism_threads() or 'default'}",
            "onednn": "off" if os.environ.get(_ENVIRONMENT["onednn"]) == "0" else "on",
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "cuda": tf.sysconfig.get_build_info().get("cuda_version") or "none", "devices": devices()}


def fingerprint_changes(recorded: dict[str, str]) -> list[str]:
    """How this process's fingerprint differs from one recorded earlier (keys it did not record are
    passed over: a run from before fingerprints has none)."""
    now = fingerprint()
    return [f"{key} {recorded[key]!r} -> {value!r}" for key, value in now.items()
            if key in recorded and recorded[key] != value]


def devices() -> str:
    """What TensorFlow trains on, e.g. `GPU:0 (NVIDIA A100), GPU:1 (...)` or `CPU:0`."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return ", ".join(device.name.removeprefix("/physical_device:") for device in tf.config.list_physical_devices("CPU"))
    return ", ".join(f"{gpu.name.removeprefix('/physical_device:')} "
                     f"({tf.config.experimental.get_device_details(gpu).get('device_name', 'GPU')})" for gpu in gpus)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow without its C++ start-up lines (absl's pre-initialisation warning, oneDNN
    and CPU-feature notices): they are written to file descriptor 2 before any log setting applies,
    so the descriptor points at /dev/null while the import runs, and while the device platforms are
    first listed (CUDA's "failed call to cuInit" on a machine without a GPU). An import error still raises."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        import tensorflow

        tensorflow.config.list_physical_devices()  # sets up the platforms, not the runtime: threads stay settable
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def distribution(runtime: dict[str, Any]):
    """The tf.distribute strategy a training runs under: TensorFlow's default (one device), or
    `mirrored` over every local GPU (or every logical CPU device where there is no GPU). Keras splits
    each global batch of data.batch_size across the replicas, so a recipe means the same on any
    number of GPUs."""
    import tensorflow as tf

    if runtime.get("strategy", "default") == "default":
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])


def set_precision(runtime: dict[str, Any]) -> None:
    """Keras' global dtype policy, for the models built after it (a saved model keeps its own).
    `auto` is settled before (flows/setup/precision.py), when the run starts."""
    import keras

    if runtime["precision"] == "auto":
        raise ValueError("runtime.precision=auto reached set_precision unsettled: flows/setup/precision.py settles it")
    keras.mixed_precision.set_global_policy(runtime["precision"])


@contextlib.contextmanager
def own_seed_draws(seed: int):
    """Inside, Keras draws the seeds of the layers and initializers that were given none (dropout,
    weights) from a generator of this thread's own, seeded as `keras.utils.set_random_seed(seed)`
    seeds Python's shared one, so they are what an undisturbed process draws. Outside, they come from
    the shared `random`, which other threads draw from too, at moments that vary with load: the
    websockets under Prefect's event client draw a ping's payload, and one such draw between the
    seeding and a model's construction gave two identical float32 trainings different dropout
    masks (epoch-1 loss 1.92412 against 1.92431)."""
    from cnnflow.components import compat

    draws = compat.swap_keras_seed_source(_ThreadsOwnDraws)
    before, draws.local.generator = getattr(draws.local, "generator", None), random.Random(seed)
    try:
        yield
    finally:
        draws.local.generator = before


class _ThreadsOwnDraws:
    """Stands in for the `random` module in Keras' seed_generator: the calling thread's generator
    while `own_seed_draws` gives it one, else the shared `random` (other threads are not touched)."""

    def __init__(self):
        self.local = threading.local()

    def __getattr__(self, name: str):
        return getattr(getattr(self.local, "generator", None) or random, name)
