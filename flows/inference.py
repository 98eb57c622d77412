"""Using trained models: evaluate one on a split, predict labels for image files.

A model is named by a training run id, `runs:/<run id>/model`, or a registry URI
(`models:/<name>@<alias>`, `models:/<name>/<version>`). Whatever preprocessing the model was trained
with is read from its run's settings, never re-typed by the user.
"""

from __future__ import annotations

import contextlib
import csv
import os
import stat
from pathlib import Path
from typing import Any

import mlflow

from cnnflow.components.errors import DataError, RunError
from cnnflow.components.images import read_image, readable_suffixes
from cnnflow.flows.orchestration import report
from cnnflow.flows.orchestration.engine import flow, run_logger, task
from cnnflow.flows.tracking import names, store


def resolve_model(reference: str) -> tuple[str, str]:
    """(model URI, training run id) of a run id (or a unique prefix), `runs:/<id>/<path>`,
    `models:/<name>`, `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    from mlflow.exceptions import MlflowException

    store.use_store({}, must_exist=True)
    client = store.mlflow_client()
    try:
        if reference.startswith("models:/"):
            name, _, version = reference.removeprefix("models:/").partition("/")
            if "@" in name:
                found = client.get_model_version_by_alias(*name.split("@", 1))
            elif version:
                found = client.get_model_version(name, version)
            else:  # no version or alias: the newest version
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise RunError(f"model {name!r} has no versions in {mlflow.get_tracking_uri()}")
                found = max(versions, key=lambda v: int(v.version))
                reference = f"models:/{name}/{found.version}"
            # a version serves through its pyfunc; evaluate and predict use the Keras model beside it
            return found.tags.get(names.KERAS_MODEL_URI, reference), found.run_id
        run_id, _, path = reference.removeprefix("runs:/").partition("/")
        run_id = store.full_run_id(run_id)
        if path:  # the model named, never silently another one
            uri = f"runs:/{run_id}/{path.rstrip('/')}"
            try:
                mlflow.models.get_model_info(uri)
            except (MlflowException, OSError) as error:
                raise RunError(f"run {run_id} has no logged model {path!r} ({str(error).splitlines()[0][:120]}); its "
                               f"model is runs:/{run_id}/model") from None
            return uri, run_id
        run = client.get_run(run_id)
        store.refuse_non_training(run)
        uri = run.data.tags.get(names.MODEL_URI, f"runs:/{run_id}/model")
        try:  # runs of cnnflow before the model_uri tag have their model at `model`
            names.MODEL_URI in run.data.tags or mlflow.models.get_model_info(uri)
        except (MlflowException, OSError):
            raise RunError(f"run {run_id} has no trained model: it ended {run.info.status} before its training finished"
                           + (f" ({run.data.tags[names.CLOSED]})" if names.CLOSED in run.data.tags else "")
                           + f". `cnnflow continue {run_id[:8]}` goes on from its last checkpoint, if it has one; "
                             f"else train it again") from None
        return uri, run_id
    except MlflowException as error:
        raise RunError(f"cannot find model {reference!r} in {mlflow.get_tracking_uri()}: "
                       f"{str(error).splitlines()[0]}") from None


@task(name="evaluate model", cache_policy="none")
def evaluate_split(model_uri: str, run_id: str, split: str) -> tuple[dict[str, float], str]:
    """Loss and metrics of the model on `split`: a role of the run's own split (train, valid, test)
    or a split string of the data (`test[:500]`); and the fingerprint of what it evaluated. A role of
    the run's split must hold what the run recorded."""
    from cnnflow.components import outputs
    from cnnflow.components.data import Split, check_same_data, examples, fingerprint_of, make_dataset, parse_split
    from cnnflow.components.data.core import partition_of, split_positions

    cfg, output_dir = store.run_settings(run_id)
    if split in ("train", "valid", "test"):
        chosen, role = Split.load(store.run_file(run_id, output_dir, "split.npz")), split
        check_same_data(cfg["data"], chosen, run_id, roles=(role,))
    else:
        partition, _ = parse_split(split)
        size = len(partition_of(cfg["data"], partition).labels)
        positions = split_positions(split, size)
        if not len(positions):
            raise DataError(f"{split} selects no images of {partition!r} ({size:,} images); give a slice that "
                            f"holds some, like {partition}[:{max(1, size // 10)}]")
        chosen, role = Split({"eval": partition}, {"eval": positions}), "eval"
    model = mlflow.keras.load_model(model_uri)
    dataset = make_dataset(cfg["data"], chosen, role, cfg["seed"])
    labels = examples(cfg["data"], chosen, role).labels
    metrics = outputs.evaluated(model, dataset, labels, bool(cfg["loss"].get("from_logits")))[0]
    return metrics, fingerprint_of(cfg["data"], chosen, role).digest


@flow(name="evaluate", flow_run_name="evaluate {model} on {split}")
def evaluate_flow(model: str, split: str = "test") -> dict[str, float]:
    """Evaluate a logged or registered model on a split; the result is an MLflow run of its own.

    Args:
        model: A training run's id (or unique prefix), `runs:/RUN_ID/model`, `models:/NAME/VERSION` or
            `models:/NAME@ALIAS` (e.g. `models:/faces@champion`).
        split: `test` (the run's own test split), `valid`, or a split string such as `test[:500]`.
    """
    model_uri, run_id = resolve_model(model)
    cfg, _ = store.run_settings(run_id)
    metrics, fingerprint = evaluate_split(model_uri, run_id, split)
    with mlflow.start_run(experiment_id=store.experiment_id(cfg), run_name=f"evaluate {split}") as run:
        store.set_tags(run.info.run_id, {names.EVALUATION_OF: run_id, names.MODEL_URI: model_uri,
                                         names.EVALUATED_SPLIT: split, names.EVALUATED_FINGERPRINT: fingerprint})
        store.log_metrics(run.info.run_id, {f"eval_{name}": value for name, value in metrics.items()})
    named = model if model == model_uri else f"{model} ({model_uri})"  # what the user asked for, and what it is
    run_logger().info(f"{named} on {split}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    report.publish_evaluation(named, split, run.info.run_id, metrics)
    return metrics


# -------------------------------------------------------------------------------------- predict

def image_files(paths: list[str]) -> list[Path]:
    """The image files named, and those inside named folders (sorted). A missing path, a link that
    leads nowhere, a folder that cannot be read, or anything that is not a regular file (a FIFO or a
    device would block or never end) is refused in one line."""
    files: list[Path] = []
    for name in paths:
        path = Path(name).expanduser()
        try:
            if path.is_dir():
                files += sorted(p for p in path.iterdir() if p.suffix.lower() in readable_suffixes()
                                and not p.name.startswith("."))
            elif path.exists():
                files.append(path)
            else:
                raise DataError(_missing(path) or f"no such image file or folder: {name}")
        except PermissionError as error:
            raise DataError(f"{name}: cannot read it ({error.strerror})") from None
    for file in files:
        try:
            mode = file.stat().st_mode  # stat, not open: opening a FIFO would block
        except OSError as error:
            raise DataError(_missing(file) or f"{file}: {error.strerror}") from None
        if not stat.S_ISREG(mode):
            raise DataError(f"{file} is not a regular file (a FIFO, a device or a socket); give image files")
    if not files:
        raise DataError(f"no images (PNG, JPEG, WebP, TIFF, BMP, GIF, ...) in {', '.join(paths)}")
    return files


def _missing(path: Path) -> str | None:
    """What is wrong with a link that leads to nothing (a deleted target, or a loop), if `path` is one."""
    if not path.is_symlink():
        return None
    return f"{path} is a link to {os.readlink(path)}, which leads to no file (deleted, or a loop of links)"


@task(name="predict", cache_policy="none")
def predict_files(model_uri: str, run_id: str, files: list[str]) -> list[dict[str, Any]]:
    """One row per image: file, predicted label, its probability (and P(positive) for binary models)."""
    from cnnflow.components import outputs
    from cnnflow.components.images import preprocessed

    cfg, output_dir = store.run_settings(run_id)
    features = store.run_features(run_id, output_dir)
    shape = tuple(features["image_shape"])
    images, errors = {}, {}
    for file in files:  # an unreadable image is its own row's error, as in the served model's answer
        try:
            images[file] = read_image(Path(file), shape, any_size=features.get("any_size", False))
        except DataError as error:
            errors[file] = str(error)
    predicted = {}
    if images:
        batch = preprocessed(list(images.values()), cfg["data"]["transforms"]["eval"])
        probabilities = outputs.probabilities(mlflow.keras.load_model(model_uri).predict(batch, verbose=0),
                                              bool(cfg["loss"].get("from_logits")))
        predicted = dict(zip(images, outputs.labelled(probabilities, features["class_names"])))
    columns = next(iter(predicted.values()), {"label": None, "probability": None}).keys()
    return [{"file": file, **predicted.get(file, dict.fromkeys(columns)), **({"error": errors.get(file, "")} if errors else {})}
            for file in files]


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[Path(v).name if c == "file" else f"{v:.4f}" if isinstance(v, float) else "-" if v is None else str(v)
              for c, v in row.items()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _figure(rows: list[dict[str, Any]], shape, path: Path) -> None:
    import matplotlib.pyplot as plt

    from cnnflow.components.plots import image_grid

    shown = rows[:24]
    # each was read and predicted already: shown as the model saw it
    figure = image_grid((read_image(Path(row["file"]), shape, any_size=True) for row in shown),
                        [f"{row['label']} ({row['probability']:.2f})" for row in shown], cols=max(1, min(6, len(shown))),
                        width=2.0, title=f"Predicted label (its probability) of "
                                         f"{'the first ' if len(rows) > len(shown) else ''}{len(shown)} of {len(rows)} images")
    figure.savefig(path, dpi=100)
    plt.close(figure)


@flow(name="predict", flow_run_name="predict with {model}")
def predict_flow(model: str, paths: list[str], csv_path: str | None = None,
                 figure_path: str | None = None) -> list[dict[str, Any]]:
    """Predicted labels and probabilities for image files or folders; prints a table, optionally
    writes it as CSV and draws the images with their predictions.

    Args:
        model: A training run's id (or unique prefix), `runs:/RUN_ID/model`, `models:/NAME/VERSION` or
            `models:/NAME@ALIAS`.
        paths: Image files (PNG, JPEG) or folders of them, as seen by the machine that runs this flow.
        csv_path: Where to write the table as CSV (optional).
        figure_path: Where to draw the images with their predictions, a PNG (optional).
    """
    model_uri, run_id = resolve_model(model)
    files = [str(f) for f in image_files(paths)]
    csv_file = csv_path and _output_path(csv_path, "--csv")
    figure_file = figure_path and _output_path(figure_path, "--figure")
    rows = predict_files(model_uri, run_id, files)
    print(_table(rows), flush=True)
    if csv_file:
        with _written_whole(csv_file) as temporary, open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    readable = [row for row in rows if not row.get("error")]
    if figure_file and readable:
        _, output_dir = store.run_settings(run_id)
        with _written_whole(figure_file) as temporary:
            _figure(readable, tuple(store.run_features(run_id, output_dir)["image_shape"]), temporary)
    report.publish_table("predictions", rows, f"{len(rows)} images predicted by {model_uri}")
    failed = [row for row in rows if row.get("error")]
    if failed:
        raise DataError(f"{len(failed)} of {len(rows)} images could not be predicted (their rows say why), the first: "
                        f"{failed[0]['error']}")
    return rows


def _output_path(name: str, option: str) -> Path:
    """An output file whose folder exists (created if need be) and takes files: checked before any
    prediction, so a bad path costs nothing."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise DataError(f"{option} {name} is a folder; give a file name")
    try:
        store.probe_writable(path.parent)
    except OSError as error:
        raise DataError(f"{option} {name}: cannot write to {path.parent} ({error.strerror or error})") from None
    return path


@contextlib.contextmanager
def _written_whole(path: Path):
    """A temporary name beside `path`, renamed into place only when the writing completed: a failed
    or interrupted predict never leaves half a file."""
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
