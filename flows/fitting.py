"""What the train task does inside: the model it starts from (untrained, an epoch's checkpoint or a
position inside an epoch), the callbacks that watch it, the fit in stages, and the trained model
saved and logged (as Keras and as the `serving` pyfunc). flows/train.py holds the DAG around it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlflow

from cnnflow.components import compat, registry
from cnnflow.components.errors import RunError
from cnnflow.flows.orchestration import interrupts
from cnnflow.flows.orchestration.engine import run_logger
from cnnflow.flows.tracking import checkpoints, names, outbox, store


@dataclass(frozen=True)
class Start:
    """Where a training starts: the untrained model, an epoch's checkpoint or a position inside an
    epoch (its arrays fill a model file, `base`)."""

    path: str
    inside_epoch: bool
    state: dict[str, Any]  # the checkpoint's state file: epoch, history, random streams, batches done
    base: str

    @classmethod
    def of(cls, model_path: str, initial_epoch: int) -> Start:
        inside_epoch = Path(model_path).suffix == ".npz"
        state = checkpoints.state_of(model_path) if initial_epoch or inside_epoch else {}
        base = str(Path(model_path).with_name(state["file"])) if inside_epoch else model_path
        return cls(model_path, inside_epoch, state, base)

    @property
    def history(self) -> dict[str, list[float]] | None:
        return self.state.get("history")

    @property
    def done(self) -> int:
        """Batches of the first epoch trained before a stop."""
        return self.state.get("batch", 0)


class Watchers(NamedTuple):
    callbacks: list
    divergence: Any  # StopOnDivergence
    checkpoint: Any  # checkpoints.EpochCheckpoint


def watchers(cfg: dict[str, Any], run_id: str, split, output: Path, start: Start, steps: int, writes) -> Watchers:
    """The callbacks of a training: the configured ones, then divergence, checkpoints, progress,
    metrics, the between-batch checks, the chance warning and, for a search's trial, its verdicts."""
    import keras

    from cnnflow.components.callbacks import EpochMetrics, EpochProgress, StopOnDivergence, WarnAtChance
    from cnnflow.components.data import examples

    history, epochs = start.history, cfg["train"]["epochs"]
    divergence = StopOnDivergence(cfg["train"]["max_loss_factor"], first_loss=(history or {}).get("loss", [None])[0])
    upload = checkpoints.checkpoint_uploader(writes, output, cfg["train"]["checkpoint_every"],
                                             cfg["train"]["checkpoint_slots"], last_epoch=epochs)
    checkpoint = checkpoints.EpochCheckpoint(
        output, history, divergence, on_saved=upload, minutes=cfg["train"]["checkpoint_minutes"], steps=steps,
        base=Path(start.base).name, resume=(start.path, start.done) if start.inside_epoch else None,
        log=writes.metrics, on_position=checkpoints.position_uploader(writes, output))

    def between_batches(batch, logs):
        interrupts.raise_if_received()
        writes.check()

    callbacks = [registry.build("callback", spec) for spec in cfg["train"]["callbacks"].values() if spec]
    callbacks += [divergence, checkpoint, EpochProgress(epochs, run_logger(), cfg["data"]["batch_size"]),
                  EpochMetrics(writes.metrics),
                  keras.callbacks.LambdaCallback(on_train_batch_end=between_batches)]
    chance = majority_share(examples(cfg["data"], split, "valid").labels)
    callbacks.append(WarnAtChance(chance, run_logger()))
    if names.SEARCH in cfg["tags"]:  # a search's trial: its search may prune it at an epoch end (flows/search/)
        from cnnflow.flows.search.pruning import Verdicts

        # last: after the epoch's checkpoint
        callbacks.append(Verdicts(run_id, epochs, run_logger(), {"val_accuracy": chance}).callback)
    return Watchers(callbacks, divergence, checkpoint)


def cache_plan(cfg: dict[str, Any], split, run_id: str) -> dict[str, str]:
    """Where each role's decoded images are kept (data.cache), said and tagged."""
    from cnnflow.components.data import cache_needs, caching

    needs = cache_needs(cfg["data"], split)
    kept = caching.plan(cfg["data"], needs)
    run_logger().info(caching.describe(kept, needs, cfg["data"]))
    store.set_tags(run_id, {names.cache_of(role): where for role, where in kept.items() if role in caching.CACHED_ROLES})
    return kept


def fit(cfg: dict[str, Any], model, split, start: Start, steps: int, initial_epoch: int, watch: Watchers,
         strategy, writes, kept: dict[str, str]) -> None:
    from cnnflow.components.data import make_dataset, read_in_full

    epochs, done = cfg["train"]["epochs"], start.done
    # Keras runs every epoch of a fit call for the same steps: the rest of an epoch stopped inside is a call of its own
    stages = [(initial_epoch, initial_epoch + 1, done), (initial_epoch + 1, epochs, 0)] if done else [(initial_epoch, epochs, 0)]
    with interrupts.noted(), strategy.scope(), outbox.failing_fast(), read_in_full():
        validation = make_dataset(cfg["data"], split, "valid", cfg["seed"], kept["valid"])
        if start.inside_epoch:  # Keras makes the metrics' (and a new optimizer's) variables when it first traces a
            compat.build_for_inputs(model, validation.element_spec)  # step; the position fills them before that
        try:
            for first, last, skipped in stages:
                if first >= last or watch.divergence.diverged or model.stop_training:
                    break
                # one pipeline for its epochs, each drawn from (seed, epoch): a resumed training draws what it would have
                model.fit(make_dataset(cfg["data"], split, "train", cfg["seed"], kept["train"], range(first, last),
                                       skipped),
                          validation_data=validation, steps_per_epoch=steps - skipped, initial_epoch=first, epochs=last,
                          callbacks=watch.callbacks, shuffle=False, verbose=0)
        finally:  # a stop keeps the position being written
            watch.checkpoint.finish_writing(quietly=True)
        writes.flush()  # what the steps after training read (metrics, the last checkpoint) is in the store


def refuse_diverged(cfg: dict[str, Any], run_id: str, where: dict[str, Any]) -> None:
    if names.SEARCH in cfg["tags"]:
        from cnnflow.flows.search.pruning import diverged_trial

        diverged_trial(run_id, where)
    raise RunError(f"training diverged: the loss became {where['loss']:.4g} in epoch {where['epoch']} (batch "
                   f"{where['batch']}) at learning rate {where['learning_rate']:.3g}; the run is FAILED and not "
                   f"registered. Lower optimizer.learning_rate (or check the data)")


def saved_and_logged(cfg: dict[str, Any], model, split, run_id: str, output: Path,
                      history: dict[str, list[float]]) -> str:
    """The trained model saved, logged as `model` (Keras) and `serving` (image files in), its history written."""
    from cnnflow.components.data import examples
    from cnnflow.components.serving import log_serving_model

    model.save(output / "model.keras")
    # The input example goes with `serving` only: MLflow 3.17's Keras flavor writes an input example
    # before it makes the model's folder (FileNotFoundError), so `model` has its signature alone.
    logged = mlflow.keras.log_model(model, name="model", pip_requirements=model_requirements(), signature=_signature(model))
    example = examples(cfg["data"], split, "test").image(0)
    serving = log_serving_model(str(output / "model.keras"), store.run_features(run_id, output), cfg["data"], cfg["loss"],
                                example, model_requirements(*SERVING_NEEDS))
    store.set_tags(run_id, {names.MODEL_URI: logged.model_uri, names.SERVING_URI: serving.model_uri})  # the newest stage's
    (output / "history.json").write_text(json.dumps(history))
    return str(output / "model.keras")


def majority_share(labels) -> float:
    """The accuracy of always answering the most common class: what a model that learnt nothing gets."""
    import numpy as np

    return float(np.bincount(labels).max() / len(labels)) if len(labels) else 0.0


# What the `serving` model imports besides TensorFlow and Keras (components/serving.py and the
# components it carries).
SERVING_NEEDS = (("mlflow",), ("numpy",), ("pandas",), ("scipy",), ("pillow",), ("annotated-types",))


def model_requirements(*more: tuple[str, ...]) -> list[str]:
    """What a logged model needs, pinned to the versions it was trained with (MLflow's own inference
    of requirements would start a subprocess per logged model): TensorFlow, Keras and `more`."""
    from importlib.metadata import PackageNotFoundError, version

    pinned = []
    for builds in (("tensorflow", "tensorflow-cpu", "tensorflow-macos"), ("keras",), *more):
        for name in builds:  # whichever build of TensorFlow is installed here
            try:
                pinned.append(f"{name}=={version(name)}")
                break
            except PackageNotFoundError:
                continue
    return pinned


def start_from(model, uri: str) -> None:
    """Copy the weights of the logged model `uri` into `model` (a warm start); they must fit."""
    from mlflow.exceptions import MlflowException

    from cnnflow.components.errors import SettingsError
    from cnnflow.flows.inference import resolve_model

    try:  # a registry version's Keras model (versions point at the serving pyfunc beside it)
        source = mlflow.keras.load_model(resolve_model(uri)[0] if uri.startswith("models:/") else uri)
    except (MlflowException, OSError, RunError) as error:
        raise SettingsError(f"train.init_from={uri}: cannot load it ({str(error).splitlines()[0][:150]})") from None
    mine, theirs = [w.shape for w in model.get_weights()], [w.shape for w in source.get_weights()]
    if mine != theirs:
        raise SettingsError(f"train.init_from={uri}: its weights ({len(theirs)} arrays) do not fit "
                            f"{model.name} ({len(mine)} arrays); start from a model of the same architecture")
    model.set_weights(source.get_weights())


def _signature(model):
    """The model's input and output as MLflow records them: float32 tensors, any batch size."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def tensor(shape):
        return Schema([TensorSpec(np.dtype(np.float32), (-1, *shape[1:]))])

    return ModelSignature(inputs=tensor(model.input_shape), outputs=tensor(model.output_shape))


def load_start_model(model_path: str, initial_epoch: int):
    """The untrained model or the checkpoint to go on from. A checkpoint that passed its checksum but
    whose contents do not read is set aside (renamed *.damaged), so the next run resumes from the one
    before it. Failures that say nothing about the file (memory, permissions, a Keras that cannot
    read what another Keras wrote) leave it in place and are reported as what they are."""
    import zipfile

    import keras
    import tensorflow as tf

    try:
        return keras.models.load_model(model_path)
    except (MemoryError, tf.errors.ResourceExhaustedError) as error:
        raise RunError(f"out of memory loading the checkpoint {model_path} ({type(error).__name__}); it is kept: "
                       f"free memory (or use a machine with more) and run the same command again") from None
    except PermissionError as error:
        raise RunError(f"cannot read the checkpoint {model_path}: {error.strerror}; it is kept: fix the folder's "
                       f"permissions and run the same command again") from None
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as error:
        if not initial_epoch:
            raise
        written = _keras_version_of(model_path)
        if written not in (None, keras.__version__):
            raise RunError(f"the checkpoint {model_path} was written by Keras {written} and "
                           f"does not load in Keras {keras.__version__} ({type(error).__name__}); it is kept: resume "
                           f"with that Keras version") from None
        state = Path(model_path).with_suffix(".json")
        if state.is_file():
            state.rename(state.with_name(state.name + ".damaged"))
        raise RunError(f"the checkpoint {model_path} does not load ({type(error).__name__}); it is set aside: run the "
                       f"same command again to resume from the checkpoint before it (or resume=false to start afresh)") \
            from None


def _keras_version_of(model_path: str) -> str | None:
    """The Keras version recorded in a .keras file's metadata.json, or None when it cannot be read."""
    import zipfile

    try:
        with zipfile.ZipFile(model_path) as archive:
            return json.loads(archive.read("metadata.json"))["keras_version"]
    except (OSError, zipfile.BadZipFile, KeyError, ValueError):
        return None


def apply_learning_rate(model, optimizer: dict[str, Any]) -> None:
    """A stage may change a fixed learning rate; the rest of the optimizer state comes from the
    checkpoint. (A schedule's rate is not a variable and stays the schedule's.)"""
    rate, current = optimizer.get("learning_rate"), model.optimizer.learning_rate
    if rate is not None and hasattr(current, "assign"):
        current.assign(rate)


def say_schedule(optimizer, initial_epoch: int, epochs: int, steps: int) -> None:
    """A learning-rate schedule fixed to the first stage's length is not stretched by a continuation:
    say where it leaves the new epochs (a cosine that has ended leaves them at its final rate)."""
    schedule = compat.learning_rate_schedule(optimizer)
    decay_steps = getattr(schedule, "decay_steps", None)
    if decay_steps is None or decay_steps >= epochs * steps:
        return
    rate_at = lambda step: float(schedule(step))  # noqa: E731
    run_logger().warning(
        f"the learning rate follows this run's {type(schedule).__name__} over its first "
        f"{decay_steps / steps:g} epochs, not stretched over epochs {initial_epoch + 1}-{epochs}: they train at "
        f"{rate_at(initial_epoch * steps):.3g} falling to {rate_at(epochs * steps):.3g} (a new run with "
        f"train.epochs={epochs} would spread the schedule over all of them)")
