"""The training flow, a DAG of Prefect tasks:

    load data -> split -> build model -> train -> evaluate -> plot

one MLflow run per flow run. Tasks pass paths, split files and run ids, never datasets or models, so
each step can be read (and retried) on its own in the Prefect UI; `cache_policy=NONE` because their
inputs are settings dicts and files, not values worth hashing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from cnnflow.components import registry
from cnnflow.components.registry import UserError
from cnnflow.flows import tracking
from cnnflow.flows.config import compose_config

# Keras' own pip requirements inference starts a subprocess per logged model; the run needs only this.
_MODEL_REQUIREMENTS = ["tensorflow-cpu", "keras"]


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry what may pass next time (a flaky download), not a wrong setting."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


def _seed_everything(cfg: dict[str, Any]) -> None:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(cfg["seed"])
    if cfg["train"].get("deterministic"):
        tf.config.experimental.enable_op_determinism()


@task(name="load data", cache_policy=NONE, retries=2, retry_delay_seconds=[5, 30],
      retry_condition_fn=_retry_unless_user_error)
def load_data(data: dict[str, Any]) -> dict[str, Any]:
    """Downloads or reads the data source; returns its features (shape, classes)."""
    from cnnflow.components.data import model_input_shape, source_from

    info = source_from(data).info
    input_shape = model_input_shape(data, info.image_shape)
    get_run_logger().info(f"data: {data['source']} {data['name']!r}, images {info.image_shape} -> model input "
                          f"{input_shape}, {info.num_classes} classes")
    return {"image_shape": list(info.image_shape), "input_shape": list(input_shape),
            "num_classes": info.num_classes, "class_names": list(info.class_names)}


@task(name="split", cache_policy=NONE)
def split_data(cfg: dict[str, Any], features: dict[str, Any], run_id: str, output_dir: str) -> str:
    """Fixed-seed train/validation/test positions, saved as split.npz; sizes become run tags and the
    per-class counts a table (split_counts.json)."""
    from cnnflow.components.data import class_counts, make_split

    split = make_split(cfg["data"], cfg["seed"])
    sizes = split.sizes()
    tracking.set_tags(run_id, {f"split.{role}_size": size for role, size in sizes.items()}
                      | {f"split.{role}": split.partitions[role] for role in sizes})
    counts = class_counts(cfg["data"], split, tuple(features["class_names"]))
    rows = [(role, name, n) for role, per_class in counts.items() for name, n in per_class.items()]
    mlflow.log_table({"split": [r[0] for r in rows], "class": [r[1] for r in rows], "count": [r[2] for r in rows]},
                     "split_counts.json", run_id=run_id)
    get_run_logger().info("split: " + "; ".join(
        f"{role} {sizes[role]} ({', '.join(f'{name} {n}' for name, n in counts[role].items())})" for role in sizes))
    return split.save(Path(output_dir) / "split.npz")


def _metrics(cfg: dict[str, Any]) -> list:
    """Keras metric names, except that `accuracy` of a one-logit model thresholds the logit at 0
    (Keras' "accuracy" would threshold it at 0.5, as if it were a probability)."""
    import keras

    one_logit = cfg["loss"]["name"] == "binary_crossentropy" and cfg["loss"].get("from_logits")
    return [keras.metrics.BinaryAccuracy(name="accuracy", threshold=0.0) if one_logit and name == "accuracy" else name
            for name in cfg["train"]["metrics"]]


@task(name="build model", cache_policy=NONE)
def build_model(cfg: dict[str, Any], features: dict[str, Any], output_dir: str) -> str:
    """The registered model, compiled with the configured loss and optimizer, saved untrained."""
    _seed_everything(cfg)
    model = registry.build("model", cfg["model"], input_shape=tuple(features["input_shape"]),
                           num_classes=features["num_classes"])
    model.compile(optimizer=registry.build("optimizer", cfg["optimizer"]),
                  loss=registry.build("loss", cfg["loss"]), metrics=_metrics(cfg))
    model.optimizer.build(model.trainable_variables)  # so the saved file holds the optimizer's variables
    get_run_logger().info(f"model {cfg['model']['name']}: {model.count_params():,} parameters")
    path = Path(output_dir) / "untrained.keras"
    model.save(path)
    return str(path)


@task(name="train", cache_policy=NONE)
def train_model(cfg: dict[str, Any], split_path: str, model_path: str, run_id: str, output_dir: str) -> str:
    """Fits for train.epochs, logging each epoch; saves the model and logs it to MLflow."""
    import keras

    from cnnflow.components.callbacks import EpochProgress, MlflowMetrics
    from cnnflow.components.data import Split, make_dataset

    _seed_everything(cfg)
    split = Split.load(split_path)
    model = keras.models.load_model(model_path)
    epochs = cfg["train"]["epochs"]
    callbacks = [registry.build("callback", spec) for spec in cfg["train"]["callbacks"].values() if spec]
    callbacks += [EpochProgress(epochs, get_run_logger()), MlflowMetrics(run_id)]
    history = model.fit(make_dataset(cfg["data"], split, "train", cfg["seed"]),
                        validation_data=make_dataset(cfg["data"], split, "valid", cfg["seed"]),
                        epochs=epochs, callbacks=callbacks, shuffle=False, verbose=0)
    output = Path(output_dir)
    model.save(output / "model.keras")
    mlflow.keras.log_model(model, name="model", pip_requirements=_MODEL_REQUIREMENTS)
    history_path = output / "history.json"
    history_path.write_text(json.dumps({name: [float(v) for v in values] for name, values in history.history.items()}))
    return str(output / "model.keras")


def _probabilities(cfg: dict[str, Any], outputs):
    """Model outputs as probabilities: one-unit logits through a sigmoid, k-unit logits through softmax."""
    import numpy as np
    from scipy.special import expit, softmax

    outputs = np.asarray(outputs)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        outputs = outputs[:, 0]
    if not cfg["loss"].get("from_logits"):
        return outputs
    return expit(outputs) if outputs.ndim == 1 else softmax(outputs, axis=1)


@task(name="evaluate", cache_policy=NONE)
def evaluate_model(cfg: dict[str, Any], split_path: str, model_path: str, run_id: str, output_dir: str) -> dict:
    """Test loss and metrics (logged as test_*), and per-image probabilities saved for the plots."""
    import keras
    import numpy as np

    from cnnflow.components.data import Split, examples, make_dataset

    split = Split.load(split_path)
    model = keras.models.load_model(model_path)
    test = make_dataset(cfg["data"], split, "test", cfg["seed"])
    metrics = {f"test_{name}": float(value) for name, value in model.evaluate(test, return_dict=True, verbose=0).items()}
    probabilities = _probabilities(cfg, model.predict(test, verbose=0))
    labels = examples(cfg["data"], split, "test").labels
    if probabilities.ndim == 1 and len(np.unique(labels)) == 2:
        from sklearn.metrics import roc_auc_score

        metrics["test_roc_auc"] = float(roc_auc_score(labels, probabilities))
    tracking.log_metrics(run_id, metrics)
    np.savez(Path(output_dir) / "predictions.npz", labels=labels, probabilities=probabilities)
    get_run_logger().info("test: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return metrics


@task(name="plot", cache_policy=NONE)
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


@flow(name="train", flow_run_name="{experiment}")
def train_flow(experiment: str = "quickstart", overrides: list[str] | None = None) -> str:
    """Train one model as the experiment (conf/experiment/<name>.yaml) and overrides say; returns the MLflow run id."""
    cfg = compose_config(experiment, overrides)
    logger = get_run_logger()
    store = tracking.use_store(cfg)
    with mlflow.start_run(experiment_id=tracking.experiment_id(cfg)) as run:
        run_id = run.info.run_id
        output_dir = Path(cfg["output_dir"]) / experiment / run_id
        output_dir.mkdir(parents=True, exist_ok=True)
        logger.info(f"MLflow run {run_id} in {store}; outputs in {output_dir}")
        tracking.log_settings(run_id, cfg, output_dir)
        tracking.set_tags(run_id, {"cnnflow.experiment": experiment, "seed": cfg["seed"],
                                   "code_version": tracking.code_version(), **cfg.get("tags", {})})
        features = load_data(cfg["data"])
        split_path = split_data(cfg, features, run_id, str(output_dir))
        untrained = build_model(cfg, features, str(output_dir))
        trained = train_model(cfg, split_path, untrained, run_id, str(output_dir))
        metrics = evaluate_model(cfg, split_path, trained, run_id, str(output_dir))
        plot_results(cfg, features, split_path, run_id, str(output_dir))
    logger.info(f"done: run {run_id}, " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return run_id
