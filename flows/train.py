"""The training flow, a DAG of Prefect tasks:

    load data -> choose precision -> split -> build model -> train -> evaluate -> plot

one MLflow run per flow run (choose precision runs for `runtime.precision=auto` in a new run: it
times the model's steps once per machine, flows/setup/precision.py). Tasks pass paths, split files and run
ids, never datasets or models (the train task takes the model build model saved from memory when
they share a process, not from the file it has just written), so
each step can be read (and retried) on its own in the Prefect UI; `cache_policy="none"` because their
inputs are settings dicts and files, not values worth hashing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import mlflow

from cnnflow.components import compat, registry
from cnnflow.components.errors import RunError, UserError, is_transient
from cnnflow.flows.orchestration import healing, interrupts, report
from cnnflow.flows.setup import precision, runtime, settings
from cnnflow.flows.tracking import lifecycle, outbox, promotion, store
from cnnflow.flows.setup.config import Experiment, compose_config, with_fields
from cnnflow.flows.orchestration.engine import flow, run_logger, task



def _retry_if_transient(task, task_run, state) -> bool:
    """Retry what may pass next time (a connection reset during a download), not a wrong setting,
    a bug or a full memory."""
    try:
        state.result()
    except UserError as error:
        return error.retryable
    except Exception as error:  # the step's own failure, whatever its type: is it one that passes?
        return is_transient(error)
    return False


def _prepare_tensorflow(cfg: dict[str, Any]) -> None:
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    _op_determinism(cfg)
    runtime.set_precision(cfg["runtime"])


def _op_determinism(cfg: dict[str, Any]) -> None:
    import tensorflow as tf

    if cfg["train"].get("deterministic"):
        tf.config.experimental.enable_op_determinism()


@task(name="load data", cache_policy="none", retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_retry_if_transient)
def load_data(data: dict[str, Any]) -> dict[str, Any]:
    """Downloads or reads the data source and checks every partition the splits use (file kinds,
    shapes, counts, label range), before any run starts; returns the features (shape, classes)."""
    from cnnflow.components.data import checked_partitions, model_input_shape, source_from

    info = source_from(data).info
    checked_partitions(data)
    input_shape = model_input_shape(data, info.image_shape)
    run_logger().info(f"data: {data['source']} {data['name']!r}, images {info.image_shape} -> model input "
                          f"{input_shape}, {info.num_classes} classes" + (f"; {info.note}" if info.note else ""))
    return {"image_shape": list(info.image_shape), "input_shape": list(input_shape),
            "num_classes": info.num_classes, "class_names": list(info.class_names), "any_size": info.any_size}


@task(name="split", cache_policy="none")
def split_data(cfg: dict[str, Any], features: dict[str, Any], run_id: str, output_dir: str) -> str:
    """Fixed-seed train/validation/test positions and what they hold (fingerprints), saved as
    split.npz; sizes and fingerprints become run tags and the per-class counts a table (split_counts.json)."""
    from cnnflow.components.data import class_counts, fingerprinted, make_split

    split = make_split(cfg["data"], cfg["seed"])
    started = time.perf_counter()
    split = fingerprinted(cfg["data"], split)
    store.log_metrics(run_id, {"fingerprint_seconds": time.perf_counter() - started})  # once per run (benchmarks/)
    sizes = split.sizes()
    store.set_tags(run_id, {f"split.{role}_size": size for role, size in sizes.items()}
                      | {f"split.{role}": split.partitions[role] for role in sizes}
                      | {f"data.{role}_fingerprint": value for role, value in split.fingerprints.items()})
    counts = class_counts(cfg["data"], split, tuple(features["class_names"]))
    rows = [(role, name, n) for role, per_class in counts.items() for name, n in per_class.items()]
    mlflow.log_table({"split": [r[0] for r in rows], "class": [r[1] for r in rows], "count": [r[2] for r in rows]},
                     "split_counts.json", run_id=run_id)
    run_logger().info("split: " + "; ".join(
        f"{role} {sizes[role]} ({', '.join(f'{name} {n}' for name, n in counts[role].items())})" for role in sizes))
    store.log_data_inputs(run_id, cfg["data"], split, features)
    path = split.save(Path(output_dir) / "split.npz")
    mlflow.MlflowClient().log_artifact(run_id, path)  # a machine without this folder resumes or evaluates from it
    return path


def _metrics(cfg: dict[str, Any]) -> list:
    """Keras metric names, except that `accuracy` of a one-logit model thresholds the logit
    (components/outputs.py says why)."""
    import keras

    from cnnflow.components import outputs

    one_logit = outputs.is_one_logit(cfg["loss"])
    return [keras.metrics.BinaryAccuracy(name="accuracy", threshold=outputs.ONE_LOGIT_THRESHOLD)
            if one_logit and name == "accuracy" else name for name in cfg["train"]["metrics"]]


def _optimizer(cfg: dict[str, Any], steps_per_epoch: int) -> Any:
    """The configured optimizer; schedules that need the training's length (`total_steps`) get it."""
    known = registry.declared("optimizer", cfg["optimizer"]["name"], total_steps=cfg["train"]["epochs"] * steps_per_epoch)
    return registry.build("optimizer", cfg["optimizer"], **known)


def _compiled_model(cfg: dict[str, Any], features: dict[str, Any], steps_per_epoch: int):
    """The registered model in Keras' current policy, its weights drawn from the seed, compiled with
    the configured loss, optimizer and metrics. A model that takes `steps_per_epoch` gets it (batch
    norm's moving statistics are paced by it: models/fast_cnn.py)."""
    known = registry.declared("model", cfg["model"]["name"], steps_per_epoch=steps_per_epoch)
    with runtime.own_seed_draws(cfg["seed"]):
        model = registry.build("model", cfg["model"], input_shape=tuple(features["input_shape"]),
                               num_classes=features["num_classes"], **known)
    model.compile(optimizer=_optimizer(cfg, steps_per_epoch), loss=registry.build("loss", cfg["loss"]),
                  metrics=_metrics(cfg))
    return model


@task(name="choose precision", cache_policy="none")
def choose_precision(cfg: dict[str, Any], features: dict[str, Any]) -> dict[str, str]:
    """`runtime.precision=auto` settled for a new training: by timing a few steps of its model the
    first time on this machine, by what was measured then afterwards (flows/setup/precision.py)."""
    _op_determinism(cfg)  # measured as it will train
    choice = precision.chosen(cfg, features, lambda: _compiled_model(cfg, features, steps_per_epoch=1))
    run_logger().info(f"precision {choice.precision} ({choice.why})")
    return {"precision": choice.precision, "why": choice.why, "basis": choice.basis}


def _settled_precision(cfg: dict[str, Any], features: dict[str, Any], run_id: str) -> dict[str, str]:
    """Sets the precision the run trains in: `auto` becomes what the run recorded when it started (it
    is resumed, or trained again from its start), else what choose_precision settles now. Returns the
    params that say why, for a run that has none yet."""
    from mlflow import MlflowClient

    if cfg["runtime"]["precision"] != "auto":
        choice = precision.chosen(cfg, features, build=None)
        return {"precision.why": choice.why, "precision.basis": choice.basis}
    recorded = MlflowClient().get_run(run_id).data.params.get("runtime.precision")
    if recorded:
        cfg["runtime"]["precision"] = recorded
        return {}
    choice = choose_precision(cfg, features)
    cfg["runtime"]["precision"] = choice["precision"]
    return {"precision.why": choice["why"], "precision.basis": choice["basis"]}


@task(name="build model", cache_policy="none")
def build_model(cfg: dict[str, Any], features: dict[str, Any], split_path: str, output_dir: str) -> str:
    """The registered model, compiled with the configured loss and optimizer, saved untrained."""
    from cnnflow.components.data import Split, steps_per_epoch

    _prepare_tensorflow(cfg)
    model = _compiled_model(cfg, features, steps_per_epoch(cfg["data"], Split.load(split_path)))
    model.optimizer.build(model.trainable_variables)  # so the saved file holds the optimizer's variables
    if cfg["train"]["init_from"]:
        _start_from(model, cfg["train"]["init_from"])
    run_logger().info(f"model {cfg['model']['name']}: {model.count_params():,} parameters"
                          + (f", weights from {cfg['train']['init_from']}" if cfg["train"]["init_from"] else ""))
    path = Path(output_dir) / "untrained.keras"
    _just_built.clear()
    if _handed_over_in_memory(cfg):
        _just_built[str(path)] = model
    else:
        model.save(path)
    return str(path)


# The model build_model made, for the train task of the same process. Writing it and reading it back
# took 0.2 and 0.25 s of the start (benchmarks/LOG.md, "Start-up"); only a distribution strategy,
# which makes its variables on every replica, loads it from the file. A position inside the first
# epoch, whose arrays fill a model file, writes that file when it first needs it (EpochCheckpoint).
_just_built: dict[str, Any] = {}


def _handed_over_in_memory(cfg: dict[str, Any]) -> bool:
    return cfg["runtime"].get("strategy", "default") == "default"


@task(name="train", cache_policy="none")
def train_model(cfg: dict[str, Any], split_path: str, model_path: str, run_id: str, output_dir: str,
                initial_epoch: int = 0) -> str:
    """Fits from `initial_epoch` up to train.epochs, logging and checkpointing every epoch; saves the
    model and logs it to MLflow. `model_path` is the untrained model or the checkpoint to go on from."""
    import keras

    from cnnflow.components.callbacks import (EpochCheckpoint, EpochMetrics, EpochProgress, StopOnDivergence,
                                              WarnAtChance, backfill_metrics, restore_random_state, state_of)
    from cnnflow.components.data import (Split, cache_needs, caching, check_same_data, examples, make_dataset,
                                         read_in_full, steps_per_epoch)
    from cnnflow.components.serving import log_serving_model

    _prepare_tensorflow(cfg)
    split = Split.load(split_path)
    check_same_data(cfg["data"], split, run_id)  # a resumed or continued training goes on with what it began
    strategy = runtime.distribution(cfg["runtime"])
    inside_epoch = Path(model_path).suffix == ".npz"  # a position inside an epoch: its arrays fill a model file
    state = state_of(model_path) if initial_epoch or inside_epoch else {}
    base = str(Path(model_path).with_name(state["file"])) if inside_epoch else model_path
    model = _just_built.pop(base, None) if _handed_over_in_memory(cfg) else None
    if model is None:
        with strategy.scope(), runtime.own_seed_draws(cfg["seed"]):  # variables, optimizer state on every replica
            model = _load_start_model(base, initial_epoch)
            restore_random_state(model, state.get("random"))
    store.set_tags(run_id, {"replicas": strategy.num_replicas_in_sync})
    model.jit_compile = cfg["runtime"]["jit_compile"]
    _apply_learning_rate(model, cfg["optimizer"])
    steps = steps_per_epoch(cfg["data"], split)
    if initial_epoch:
        _say_schedule(model.optimizer, initial_epoch, cfg["train"]["epochs"], steps)
    output = Path(output_dir)
    history = state.get("history")
    if history:
        backfill_metrics(run_id, history)
    divergence = StopOnDivergence(cfg["train"]["max_loss_factor"], first_loss=(history or {}).get("loss", [None])[0])
    epochs = cfg["train"]["epochs"]
    writes = lifecycle.writer(run_id)  # metrics and checkpoints go to the store beside the training
    upload = lifecycle.checkpoint_uploader(writes, output, cfg["train"]["checkpoint_every"],
                                           cfg["train"]["checkpoint_slots"], last_epoch=epochs)
    done = state.get("batch", 0)  # batches of epoch initial_epoch + 1 trained before a stop
    checkpoint = EpochCheckpoint(output, history, divergence, on_saved=upload, minutes=cfg["train"]["checkpoint_minutes"],
                                 steps=steps, base=Path(base).name, resume=(model_path, done) if inside_epoch else None,
                                 log=writes.metrics, on_position=lifecycle.position_uploader(writes, output))

    def between_batches(batch, logs):
        interrupts.raise_if_received()
        writes.check()

    callbacks = [registry.build("callback", spec) for spec in cfg["train"]["callbacks"].values() if spec]
    callbacks += [divergence, checkpoint, EpochProgress(epochs, run_logger(), cfg["data"]["batch_size"]),
                  EpochMetrics(writes.metrics),
                  keras.callbacks.LambdaCallback(on_train_batch_end=between_batches)]
    chance = _majority_share(examples(cfg["data"], split, "valid").labels)
    callbacks.append(WarnAtChance(chance, run_logger()))
    if "search" in cfg["tags"]:  # a search's trial: its search may prune it at an epoch end (flows/search/)
        from cnnflow.flows.search.pruning import Verdicts

        # last: after the epoch's checkpoint
        callbacks.append(Verdicts(run_id, epochs, run_logger(), {"val_accuracy": chance}).callback)
    needs = cache_needs(cfg["data"], split)
    kept = caching.plan(cfg["data"], needs)
    run_logger().info(caching.describe(kept, needs, cfg["data"]))
    store.set_tags(run_id, {f"cache.{role}": where for role, where in kept.items() if role in caching.CACHED_ROLES})
    # Keras runs every epoch of a fit call for the same steps: the rest of an epoch stopped inside is a call of its own
    stages = [(initial_epoch, initial_epoch + 1, done), (initial_epoch + 1, epochs, 0)] if done else [(initial_epoch, epochs, 0)]
    with interrupts.noted(), strategy.scope(), outbox.failing_fast(), read_in_full():
        validation = make_dataset(cfg["data"], split, "valid", cfg["seed"], kept["valid"])
        if inside_epoch:  # Keras makes the metrics' (and a new optimizer's) variables when it first traces a step; the
            compat.build_for_inputs(model, validation.element_spec)  # position fills them before that
        try:
            for first, last, skipped in stages:
                if first >= last or divergence.diverged or model.stop_training:
                    break
                # one pipeline for its epochs, each drawn from (seed, epoch): a resumed training draws what it would have
                model.fit(make_dataset(cfg["data"], split, "train", cfg["seed"], kept["train"], range(first, last),
                                       skipped),
                          validation_data=validation, steps_per_epoch=steps - skipped, initial_epoch=first, epochs=last,
                          callbacks=callbacks, shuffle=False, verbose=0)
        finally:  # a stop keeps the position being written
            checkpoint.finish_writing(quietly=True)
        writes.flush()  # what the steps after training read (metrics, the last checkpoint) is in the store
    if divergence.diverged:
        where = divergence.diverged
        if "search" in cfg["tags"]:
            from cnnflow.flows.search.pruning import diverged_trial

            diverged_trial(run_id, where)
        raise RunError(f"training diverged: the loss became {where['loss']:.4g} in epoch {where['epoch']} (batch "
                       f"{where['batch']}) at learning rate {where['learning_rate']:.3g}; the run is FAILED and not "
                       f"registered. Lower optimizer.learning_rate (or check the data)")
    model.save(output / "model.keras")
    # The input example goes with `serving` only: MLflow 3.17's Keras flavor writes an input example
    # before it makes the model's folder (FileNotFoundError), so `model` has its signature alone.
    logged = mlflow.keras.log_model(model, name="model", pip_requirements=model_requirements(), signature=_signature(model))
    example = examples(cfg["data"], split, "test").image(0)
    serving = log_serving_model(str(output / "model.keras"), store.run_features(run_id, output), cfg["data"], cfg["loss"],
                                example, model_requirements(*SERVING_NEEDS))
    store.set_tags(run_id, {"model_uri": logged.model_uri, "serving_uri": serving.model_uri})  # the newest stage's
    (output / "history.json").write_text(json.dumps(checkpoint.history))
    return str(output / "model.keras")


def _majority_share(labels) -> float:
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
    for names in (("tensorflow", "tensorflow-cpu", "tensorflow-macos"), ("keras",), *more):
        for name in names:  # whichever build of TensorFlow is installed here
            try:
                pinned.append(f"{name}=={version(name)}")
                break
            except PackageNotFoundError:
                continue
    return pinned


def _start_from(model, uri: str) -> None:
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


def _load_start_model(model_path: str, initial_epoch: int):
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


def _apply_learning_rate(model, optimizer: dict[str, Any]) -> None:
    """A stage may change a fixed learning rate; the rest of the optimizer state comes from the
    checkpoint. (A schedule's rate is not a variable and stays the schedule's.)"""
    rate, current = optimizer.get("learning_rate"), model.optimizer.learning_rate
    if rate is not None and hasattr(current, "assign"):
        current.assign(rate)


def _say_schedule(optimizer, initial_epoch: int, epochs: int, steps: int) -> None:
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


@task(name="evaluate", cache_policy="none")
def evaluate_model(cfg: dict[str, Any], split_path: str, model_path: str, run_id: str, output_dir: str,
                   epochs_done: int = 0) -> dict:
    """Test loss and metrics (logged as test_*, step = epochs trained, so each stage keeps its own
    value), and per-image probabilities saved for the plots."""
    import keras
    import numpy as np

    from cnnflow.components import outputs
    from cnnflow.components.data import Split, examples, make_dataset

    split = Split.load(split_path)
    model = keras.models.load_model(model_path)
    test = make_dataset(cfg["data"], split, "test", cfg["seed"])
    labels = examples(cfg["data"], split, "test").labels
    metrics, probabilities = outputs.evaluated(model, test, labels, bool(cfg["loss"].get("from_logits")))
    metrics = {f"test_{name}": value for name, value in metrics.items()}
    store.log_metrics(run_id, metrics, step=epochs_done)
    np.savez(Path(output_dir) / "predictions.npz", labels=labels, probabilities=probabilities)
    run_logger().info("test: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return metrics


@task(name="plot", cache_policy="none")
def plot_results(cfg: dict[str, Any], features: dict[str, Any], split_path: str, run_id: str,
                 output_dir: str) -> list[str]:
    """The configured figures, written to <output>/figures/ and logged to the run's figures/."""
    import matplotlib.pyplot as plt
    import numpy as np
    from mlflow import MlflowClient

    from cnnflow.components.data import Split, examples
    from cnnflow.components.plots import Results

    output = Path(output_dir)
    test = examples(cfg["data"], Split.load(split_path), "test")
    with np.load(output / "predictions.npz") as predictions:
        results = Results(history=json.loads((output / "history.json").read_text()), test=test,
                          probabilities=predictions["probabilities"], class_names=tuple(features["class_names"]))
    figures_dir = output / "figures"
    figures_dir.mkdir(exist_ok=True)
    paths = []
    for label, spec in cfg["plots"].items():
        if not spec:
            continue
        figure = registry.build("plot", spec, results=results)
        path = figures_dir / f"{label}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        MlflowClient().log_artifact(run_id, str(path), "figures")
        paths.append(str(path))
    return paths


def _fit_evaluate_plot(cfg: dict[str, Any], run_id: str, output_dir: Path, features: dict[str, Any],
                       split_path: str, start_model: str, initial_epoch: int) -> dict[str, float]:
    """The part of the DAG that a new training, a resumed one and a continuation share."""
    from mlflow import MlflowClient

    from cnnflow.components.callbacks import read_checkpoint

    hardware = {"devices": runtime.devices(), "precision": cfg["runtime"]["precision"]}
    store.set_tags(run_id, hardware)
    run_logger().info(f"training on {hardware['devices']} in {hardware['precision']}")
    trained = train_model(cfg, split_path, start_model, run_id, str(output_dir), initial_epoch)
    epochs_done = read_checkpoint(output_dir)["epoch"]
    if cfg["train"]["test"]:
        metrics = evaluate_model(cfg, split_path, trained, run_id, str(output_dir), epochs_done)
        plot_results(cfg, features, split_path, run_id, str(output_dir))
    else:  # a search chooses on validation; the test split is kept for the one run chosen
        metrics = {name: MlflowClient().get_run(run_id).data.metrics[name] for name in ("val_loss", "val_accuracy")}
        run_logger().info("test split not evaluated (train.test=false): validation only")
    promotion.maybe_register(cfg, run_id, run_logger())
    report.publish_training(run_id, epochs_done, metrics, output_dir)
    lifecycle.tidy_finished(run_id, Path(output_dir), epochs_done, cfg["train"]["keep_checkpoints"], run_logger())
    return metrics


@flow(name="train", flow_run_name="{experiment}")
def train_flow(experiment: Experiment = "quickstart", overrides: list[str] | None = None, epochs: int | None = None,
               batch_size: int | None = None, data_source: str | None = None, data_path: str | None = None,
               train_size: int | Literal["full"] | None = None, seed: int | None = None) -> str:
    """Train one model as a recipe and its overrides say; returns the MLflow run id.

    An unfinished run of the same settings (killed, crashed, interrupted) is resumed from its last
    completed epoch instead, unless `resume=false`.

    Args:
        experiment: The recipe (conf/experiment/NAME.yaml): it sets the data, model, loss, optimizer and
            training. The fields below change its most-changed settings; leave them None to keep the recipe's.
        overrides: Any other setting, one `key=value` per item, as on the command line, e.g.
            `optimizer.learning_rate=0.0005`, `data.valid_size=5000`, `data.train_split="train[:50%]"`,
            `registry.name=faces`; `+key=value` adds a key. Applied after the fields above.
        epochs: train.epochs: how many epochs to train. None: the recipe's (20 for the chapter's recipes).
        batch_size: data.batch_size: images per training step. None: the recipe's.
        data_source: data.source: where the images come from: tfds (TensorFlow Datasets, downloads), idx
            (the original MNIST-format files), celeba_folder (CelebA's own files), folder (your own images in
            class subfolders), digits (bundled), or a plugin's (`cnnflow components` lists them). None: the recipe's.
        data_path: data.path: the folder with the data files, for the idx, celeba_folder and folder sources
            (the folder recipe: experiment folder).
        train_size: data.train_size: how many training images, or full for all of them. None: the recipe's.
        seed: The seed of the split, the shuffles, the augmentations and the initial weights. None: the recipe's (1).
    """
    overrides = with_fields(overrides, epochs=epochs, batch_size=batch_size, data_source=data_source,
                            data_path=data_path, train_size=train_size, seed=seed)
    cfg = compose_config(experiment, overrides)
    logger = run_logger()
    runtime.use_environment(cfg["runtime"], logger)
    unused = settings.unused_settings(cfg)
    if unused:
        logger.warning(f"settings the chosen components do not read (others of their kind do): {', '.join(unused)}")
    restart = healing.restart_number()
    if restart:  # before anything that needs a server: the outage that crashed it may go on
        healing.wait_before_restart(restart, logger)
    from cnnflow.components.data import caching, read_ahead

    read_ahead(cfg["data"])  # while the store is set up (a worker's flow; the CLI started it already)
    uri = store.use_store(cfg)
    features = load_data(cfg["data"])  # bad data files stop here, before any run exists
    settings.check_model_fits(cfg, features["num_classes"])
    caching.check_folder(cfg["data"])
    finished = healing.outcome_of_earlier_attempt(cfg["train"]["lease_timeout"], logger) if restart else None
    if finished:
        logger.info(f"done: run {finished} was finished by an earlier attempt of this job")
        return finished
    with lifecycle.claimed_run(cfg, logger, restart) as (run_id, output_dir, checkpoint):
        if checkpoint:
            inside = f" and {checkpoint['batch']} steps of epoch {checkpoint['epoch'] + 1}" if checkpoint.get("batch") else ""
            logger.info(f"resuming MLflow run {run_id} after epoch {checkpoint['epoch']}{inside}; outputs in {output_dir} "
                        f"(resume=false starts a new run instead)")
            split_path = str(store.run_file(run_id, output_dir, "split.npz"))
            start_model, initial_epoch = checkpoint["path"], checkpoint["epoch"]
            _settled_precision(cfg, features, run_id)
        else:
            logger.info(f"MLflow run {run_id} in {uri}; outputs in {output_dir}")
            store.log_settings(run_id, cfg, output_dir, features, _settled_precision(cfg, features, run_id))
            split_path = split_data(cfg, features, run_id, str(output_dir))
            start_model, initial_epoch = build_model(cfg, features, split_path, str(output_dir)), 0
        metrics = _fit_evaluate_plot(cfg, run_id, output_dir, features, split_path, start_model, initial_epoch)
    logger.info(f"done: run {run_id}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return run_id


@flow(name="continue", flow_run_name="continue {run_id}")
def continue_flow(run_id: str, epochs: int = 10, overrides: list[str] | None = None) -> str:
    """Train a finished (or stopped) run for `epochs` more epochs, in the same MLflow run.

    Epoch numbers, the metric history and the optimizer state carry on; the stage is recorded as
    tags stage.<n>.epochs / stage.<n>.overrides. Overrides may change how training goes on (learning
    rate, callbacks, plots) but not what is trained (data, model, loss, seed, optimizer type).

    Args:
        run_id: The MLflow run to train on (its id, or a unique prefix as `cnnflow runs` prints it).
        epochs: How many more epochs: a run that has trained 20 goes on with epochs 21 to 20 + this.
        overrides: Settings that may change between stages, one `key=value` per item, e.g.
            `optimizer.learning_rate=0.0001`; settings that define what is trained are refused.
    """
    from cnnflow.components.data import Split, check_same_data
    from cnnflow.components.errors import SettingsError
    from cnnflow.flows.setup.config import DATA_LOCATIONS

    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise SettingsError(f"epochs={epochs!r}: continue needs a positive number of epochs")
    store.use_store({}, must_exist=True)
    run_id = store.full_run_id(run_id)
    stored, output_dir = store.run_settings(run_id)  # in the store it was found in, whatever the run once named
    cfg = compose_config(stored["experiment"], stored["overrides"] + list(overrides or []))
    if cfg["runtime"]["precision"] == "auto" or not any(o.startswith("runtime.precision=") for o in overrides or []):
        # what `auto` settled on when the run started, even where it would settle otherwise now
        cfg["runtime"]["precision"] = stored.get("runtime", {}).get("precision", cfg["runtime"]["precision"])
    split_path = str(store.run_file(run_id, output_dir, "split.npz"))
    # the data may have moved (another folder, machine, a relative path typed elsewhere) when its
    # fingerprint says it is the same: the train task checks that before it trains
    recorded = Split.load(split_path)
    lifecycle.refuse_frozen_changes(stored, cfg, tuple(f"data.{key}" for key in DATA_LOCATIONS)
                                    if recorded.fingerprints else ())
    logger = run_logger()
    checkpoint, skipped = lifecycle.newest_checkpoint(run_id, output_dir, logger)
    if checkpoint is None:
        why = "; ".join(skipped) or f"none in {output_dir} or in the run's artifacts"
        raise RunError(f"run {run_id} has no usable checkpoint ({why}); it cannot be continued")
    cfg["train"]["epochs"] = checkpoint["epoch"] + epochs
    runtime.use_environment(cfg["runtime"], logger)
    features = load_data(cfg["data"])
    check_same_data(cfg["data"], recorded, run_id)  # refused before the run is touched
    with lifecycle.tracked_run(cfg, run_id, logger) as (run_id, output_dir):
        stage = lifecycle.next_stage(run_id)
        store.set_tags(run_id, {f"stage.{stage}.epochs": f"{checkpoint['epoch'] + 1}-{cfg['train']['epochs']}",
                                   f"stage.{stage}.overrides": " ".join(overrides or []) or "(none)",
                                   "stages": stage, "epochs_total": cfg["train"]["epochs"]})
        logger.info(f"continuing run {run_id}: stage {stage}, epochs {checkpoint['epoch'] + 1}-{cfg['train']['epochs']}")
        metrics = _fit_evaluate_plot(cfg, run_id, output_dir, features, split_path, checkpoint["path"], checkpoint["epoch"])
    logger.info(f"done: run {run_id}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return run_id
