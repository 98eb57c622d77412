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

from cnnflow.components import registry
from cnnflow.components.errors import RunError, UserError, is_transient
from cnnflow.flows.orchestration import healing, report
from cnnflow.flows.orchestration.engine import flow, run_logger, task
from cnnflow.flows.setup import precision, runtime, settings
from cnnflow.flows.setup.config import Experiment, compose_config, with_fields
from cnnflow.flows.tracking import lifecycle, names, promotion, store


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
    store.set_tags(run_id, {names.split_size(role): size for role, size in sizes.items()}
                      | {names.split_partition(role): split.partitions[role] for role in sizes}
                      | {names.data_fingerprint(role): value for role, value in split.fingerprints.items()})
    counts = class_counts(cfg["data"], split, tuple(features["class_names"]))
    rows = [(role, name, n) for role, per_class in counts.items() for name, n in per_class.items()]
    mlflow.log_table({"split": [r[0] for r in rows], "class": [r[1] for r in rows], "count": [r[2] for r in rows]},
                     "split_counts.json", run_id=run_id)
    run_logger().info("split: " + "; ".join(
        f"{role} {sizes[role]} ({', '.join(f'{name} {n}' for name, n in counts[role].items())})" for role in sizes))
    store.log_data_inputs(run_id, cfg["data"], split, features)
    path = split.save(Path(output_dir) / "split.npz")
    store.mlflow_client().log_artifact(run_id, path)  # a machine without this folder resumes or evaluates from it
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

    if cfg["runtime"]["precision"] != "auto":
        choice = precision.chosen(cfg, features, build=None)
        return {names.PRECISION_WHY: choice.why, names.PRECISION_BASIS: choice.basis}
    recorded = store.mlflow_client().get_run(run_id).data.params.get("runtime.precision")
    if recorded:
        cfg["runtime"]["precision"] = recorded
        return {}
    choice = choose_precision(cfg, features)
    cfg["runtime"]["precision"] = choice["precision"]
    return {names.PRECISION_WHY: choice["why"], names.PRECISION_BASIS: choice["basis"]}


@task(name="build model", cache_policy="none")
def build_model(cfg: dict[str, Any], features: dict[str, Any], split_path: str, output_dir: str) -> str:
    """The registered model, compiled with the configured loss and optimizer, saved untrained."""
    from cnnflow.components.data import Split, steps_per_epoch
    from cnnflow.flows import fitting

    _prepare_tensorflow(cfg)
    model = _compiled_model(cfg, features, steps_per_epoch(cfg["data"], Split.load(split_path)))
    model.optimizer.build(model.trainable_variables)  # so the saved file holds the optimizer's variables
    if cfg["train"]["init_from"]:
        fitting.start_from(model, cfg["train"]["init_from"])
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
    from cnnflow.components.data import Split, check_same_data, steps_per_epoch
    from cnnflow.flows import fitting  # with it Keras: only now, after the thread settings (_prepare_tensorflow)
    from cnnflow.flows.tracking import checkpoints

    _prepare_tensorflow(cfg)
    split = Split.load(split_path)
    check_same_data(cfg["data"], split, run_id)  # a resumed or continued training goes on with what it began
    strategy = runtime.distribution(cfg["runtime"])
    start = fitting.Start.of(model_path, initial_epoch)
    model = _just_built.pop(start.base, None) if _handed_over_in_memory(cfg) else None
    if model is None:
        with strategy.scope(), runtime.own_seed_draws(cfg["seed"]):  # variables, optimizer state on every replica
            model = fitting.load_start_model(start.base, initial_epoch)
            checkpoints.restore_random_state(model, start.state.get("random"))
    store.set_tags(run_id, {names.REPLICAS: strategy.num_replicas_in_sync})
    model.jit_compile = cfg["runtime"]["jit_compile"]
    fitting.apply_learning_rate(model, cfg["optimizer"])
    steps = steps_per_epoch(cfg["data"], split)
    if initial_epoch:
        fitting.say_schedule(model.optimizer, initial_epoch, cfg["train"]["epochs"], steps)
    if start.history:
        store.backfill_metrics(run_id, start.history)
    writes = lifecycle.writer(run_id)  # metrics and checkpoints go to the store beside the training
    watch = fitting.watchers(cfg, run_id, split, Path(output_dir), start, steps, writes)
    fitting.fit(cfg, model, split, start, steps, initial_epoch, watch, strategy, writes, fitting.cache_plan(cfg, split, run_id))
    if watch.divergence.diverged:
        fitting.refuse_diverged(cfg, run_id, watch.divergence.diverged)
    return fitting.saved_and_logged(cfg, model, split, run_id, Path(output_dir), watch.checkpoint.history)


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
    import numpy as np

    from cnnflow.components.data import Split, examples
    from cnnflow.components.plots import Results, saved

    output = Path(output_dir)
    test = examples(cfg["data"], Split.load(split_path), "test")
    with np.load(output / "predictions.npz") as predictions:
        results = Results(history=json.loads((output / "history.json").read_text()), test=test,
                          probabilities=predictions["probabilities"], class_names=tuple(features["class_names"]))
    paths = saved("plot", cfg["plots"], output / "figures", results=results)
    for path in paths:
        store.mlflow_client().log_artifact(run_id, str(path), "figures")
    return [str(path) for path in paths]


def _fit_evaluate_plot(cfg: dict[str, Any], run_id: str, output_dir: Path, features: dict[str, Any],
                       split_path: str, start_model: str, initial_epoch: int) -> dict[str, float]:
    """The part of the DAG that a new training, a resumed one and a continuation share."""
    from cnnflow.flows.tracking import checkpoints

    hardware = {names.DEVICES: runtime.devices(), names.PRECISION: cfg["runtime"]["precision"]}
    store.set_tags(run_id, hardware)
    run_logger().info(f"training on {hardware['devices']} in {hardware['precision']}")
    trained = train_model(cfg, split_path, start_model, run_id, str(output_dir), initial_epoch)
    epochs_done = checkpoints.read_checkpoint(output_dir)["epoch"]
    if cfg["train"]["test"]:
        metrics = evaluate_model(cfg, split_path, trained, run_id, str(output_dir), epochs_done)
        plot_results(cfg, features, split_path, run_id, str(output_dir))
    else:  # a search chooses on validation; the test split is kept for the one run chosen
        metrics = {name: store.mlflow_client().get_run(run_id).data.metrics[name] for name in ("val_loss", "val_accuracy")}
        run_logger().info("test split not evaluated (train.test=false): validation only")
    promotion.maybe_register(cfg, run_id, run_logger())
    report.publish_training(run_id, epochs_done, metrics, output_dir)
    checkpoints.tidy_finished(run_id, Path(output_dir), epochs_done, cfg["train"]["keep_checkpoints"], run_logger())
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
        start = _resumed(cfg, features, run_id, output_dir, checkpoint, logger) if checkpoint else \
            _started(cfg, features, run_id, output_dir, uri, logger)
        metrics = _fit_evaluate_plot(cfg, run_id, output_dir, features, *start)
    logger.info(f"done: run {run_id}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return run_id


def _started(cfg: dict[str, Any], features: dict[str, Any], run_id: str, output_dir: Path, uri: str,
             logger) -> tuple[str, str, int]:
    """A new run's (split file, model to train, first epoch): settings logged, data split, model built."""
    logger.info(f"MLflow run {run_id} in {uri}; outputs in {output_dir}")
    store.log_settings(run_id, cfg, output_dir, features, _settled_precision(cfg, features, run_id))
    split_path = split_data(cfg, features, run_id, str(output_dir))
    return split_path, build_model(cfg, features, split_path, str(output_dir)), 0


def _resumed(cfg: dict[str, Any], features: dict[str, Any], run_id: str, output_dir: Path, checkpoint: dict,
             logger) -> tuple[str, str, int]:
    """An unfinished run's (split file, model to train, first epoch): where its last checkpoint left it."""
    inside = f" and {checkpoint['batch']} steps of epoch {checkpoint['epoch'] + 1}" if checkpoint.get("batch") else ""
    logger.info(f"resuming MLflow run {run_id} after epoch {checkpoint['epoch']}{inside}; outputs in {output_dir} "
                f"(resume=false starts a new run instead)")
    split_path = str(store.run_file(run_id, output_dir, "split.npz"))
    _settled_precision(cfg, features, run_id)
    return split_path, checkpoint["path"], checkpoint["epoch"]


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
    from cnnflow.flows.tracking.checkpoints import newest_checkpoint

    checkpoint, skipped = newest_checkpoint(run_id, output_dir, logger)
    if checkpoint is None:
        why = "; ".join(skipped) or f"none in {output_dir} or in the run's artifacts"
        raise RunError(f"run {run_id} has no usable checkpoint ({why}); it cannot be continued")
    cfg["train"]["epochs"] = checkpoint["epoch"] + epochs
    runtime.use_environment(cfg["runtime"], logger)
    features = load_data(cfg["data"])
    check_same_data(cfg["data"], recorded, run_id)  # refused before the run is touched
    with lifecycle.tracked_run(cfg, run_id, logger) as (run_id, output_dir):
        stage = lifecycle.next_stage(run_id)
        store.set_tags(run_id, {names.stage_epochs(stage): f"{checkpoint['epoch'] + 1}-{cfg['train']['epochs']}",
                                   names.stage_overrides(stage): " ".join(overrides or []) or "(none)",
                                   names.STAGES: stage, names.EPOCHS_TOTAL: cfg["train"]["epochs"]})
        logger.info(f"continuing run {run_id}: stage {stage}, epochs {checkpoint['epoch'] + 1}-{cfg['train']['epochs']}")
        metrics = _fit_evaluate_plot(cfg, run_id, output_dir, features, split_path, checkpoint["path"], checkpoint["epoch"])
    logger.info(f"done: run {run_id}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return run_id
