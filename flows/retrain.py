"""Scheduled retraining: each run trains on the next, larger training subset, registers its model
as a new version, and makes it champion only if it beats the champion on the fixed validation set.

The sequence is read back from MLflow (runs tagged retrain_schedule=<name> that finished), so a
restarted server, a missed schedule or a manual run keep it right.
"""

from __future__ import annotations

from typing import Any

from cnnflow.flows.orchestration.engine import flow, run_logger
from cnnflow.flows.setup.config import Experiment, compose_config, with_fields
from cnnflow.flows.tracking import names, store
from cnnflow.flows.train import train_flow


def next_subset_size(sizes: list[Any], finished_runs: int) -> Any:
    """The training subset of the next run: sizes[n] after n finished runs; the last size repeats
    (the settings' schema makes sure there is one)."""
    return sizes[min(finished_runs, len(sizes) - 1)]


def checked_sizes(cfg: dict[str, Any], overrides: list[str]) -> list[Any]:
    """retrain.sizes measured against the training pool, so that no schedule can get stuck on a size
    the data cannot give (failed runs do not advance the sequence). The default sequence is cut at
    `full`; sizes someone chose that do not fit are an error naming the pool's size."""
    from cnnflow.components.data import training_pool_size
    from cnnflow.components.errors import SettingsError

    sizes, pool = cfg["retrain"]["sizes"], training_pool_size(cfg["data"])
    too_big = [size for size in sizes if size != "full" and size > pool]
    if not too_big:
        return sizes
    if any(override.lstrip("+").startswith("retrain.sizes=") for override in overrides):
        raise SettingsError(f"retrain.sizes={sizes}: {too_big[0]} is more than the {pool} training examples the data "
                            f"has ({cfg['data']['train_split']!r} less data.valid_size); give sizes up to {pool}, "
                            f"or full")
    return [size for size in sizes if size != "full" and size <= pool] + ["full"]


def schedule_name(cfg: dict[str, Any]) -> str:
    return cfg["retrain"].get("schedule") or f"{cfg['experiment']}-retrain"


def finished_runs(cfg: dict[str, Any], schedule: str) -> list:
    import mlflow

    found = mlflow.get_experiment_by_name(cfg.get("mlflow_experiment") or cfg["experiment"])
    if not found:
        return []
    return mlflow.search_runs([found.experiment_id], output_format="list", order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.{names.RETRAIN_SCHEDULE} = '{schedule}' and attributes.status = 'FINISHED'")


def current_champion(cfg: dict[str, Any]):
    """The registry version that holds the alias, or None."""
    from mlflow.exceptions import MlflowException

    spec = cfg["registry"]
    try:
        return store.mlflow_client().get_model_version_by_alias(spec["name"], spec["alias"])
    except MlflowException:
        return None


@flow(name="retrain", flow_run_name="retrain {experiment}")
def retrain_flow(experiment: Experiment = "celeba", overrides: list[str] | None = None, epochs: int | None = None,
                 batch_size: int | None = None, data_source: str | None = None, data_path: str | None = None,
                 seed: int | None = None) -> str:
    """Train the next subset size of the schedule (retrain.sizes) and promote it if it is better.

    Args:
        experiment: The recipe to retrain (conf/experiment/NAME.yaml); its runs form one sequence.
        overrides: Any other setting, one `key=value` per item, e.g. `retrain.sizes=[16000,32000,full]`,
            `retrain.warm_start=true`, `registry.name=faces`. Applied after the fields below.
        epochs: train.epochs of each run. None: the recipe's.
        batch_size: data.batch_size. None: the recipe's.
        data_source: data.source: tfds, idx, celeba_folder or digits. None: the recipe's.
        data_path: data.path: the folder with the data files, for the idx and celeba_folder sources.
        seed: The seed of every run of the sequence. None: the recipe's.
    """
    overrides = with_fields(overrides, epochs=epochs, batch_size=batch_size, data_source=data_source,
                            data_path=data_path, seed=seed)
    cfg = compose_config(experiment, overrides)
    if not cfg["registry"].get("name"):
        cfg = compose_config(experiment, overrides + [f"registry.name={experiment}"])
    store.use_store(cfg)
    schedule = schedule_name(cfg)
    done = finished_runs(cfg, schedule)
    sizes = checked_sizes(cfg, overrides)
    size = next_subset_size(sizes, len(done))
    champion = current_champion(cfg)
    name = cfg["registry"]["name"]
    before = f"{name} v{champion.version} (run {champion.run_id})" if champion else "none"
    # a warm start begins from the champion's weights: its concrete version, not the moving alias
    warm = f"models:/{name}/{champion.version}" if champion and cfg["retrain"]["warm_start"] else None
    run_logger().info(f"retrain {schedule}: run {len(done) + 1} of the sequence {sizes}, data.train_size={size}, "
                          f"champion before: {before}" + (", starting from its weights" if warm else ""))
    run_id = train_flow(experiment, overrides + [
        f"data.train_size={size}", f"registry.name={name}",
        f"+tags.{names.RETRAIN_SCHEDULE}={schedule}", f"+tags.{names.RETRAIN_SUBSET_SIZE}={size}",
        f"+tags.{names.RETRAIN_SEQUENCE}={len(done) + 1}", f"+tags.{names.RETRAIN_PREVIOUS_CHAMPION}='{before}'",
        f"+tags.{names.RETRAIN_WARM_START}={warm or 'no'}", *([f"train.init_from={warm}"] if warm else []),
        "resume=false",
    ])
    if done:
        _check_growth(done[-1].info.run_id, run_id)
    _log_sequence_figure(run_id, finished_runs(cfg, schedule), current_champion(cfg))
    return run_id


def _check_growth(previous: str, run_id: str) -> None:
    """Whether the new run's training subset holds every example of the previous run's, compared by
    their bytes: said in the log and as tags (retrain_contains_previous, retrain_added)."""
    from cnnflow.components.data import changes
    from cnnflow.components.errors import DataError
    from cnnflow.flows.runs import recorded_split

    try:
        found = changes(recorded_split(previous), recorded_split(run_id), "train")
    except DataError as error:  # a previous run from before fingerprints
        run_logger().warning(f"retrain: not compared with run {previous}: {error}")
        return
    grew = not found["removed"] and not found["changed"]
    store.set_tags(run_id, {names.RETRAIN_PREVIOUS_RUN: previous, names.RETRAIN_ADDED: found["added"],
                            names.RETRAIN_CONTAINS_PREVIOUS: grew})
    if grew:
        run_logger().info(f"retrain: the training subset holds all {found['kept']:,} examples of run {previous[:8]} "
                          f"and {found['added']:,} more")
    else:
        run_logger().warning(f"retrain: the training subset does not hold the previous run's ({previous[:8]}): "
                             f"{found['removed']:,} of its examples left out, {found['changed']:,} changed since "
                             f"(cnnflow data diff {previous[:8]} {run_id[:8]})")


def sequence_points(runs: list) -> list[tuple[int, float, str]]:
    """(training images, last validation accuracy, run id) of each finished run of a sequence, in order."""
    train_size = names.split_size("train")
    return [(int(run.data.tags[train_size]), run.data.metrics["val_accuracy"], run.info.run_id)
            for run in runs if train_size in run.data.tags and "val_accuracy" in run.data.metrics]


def _log_sequence_figure(run_id: str, runs: list, champion) -> None:
    """Validation accuracy against training images over the sequence's finished runs, the champion
    ringed: logged to the newest run as figures/retrain_sequence.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    points = sequence_points(runs)
    if not points:
        return
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([p[0] for p in points], [p[1] for p in points], "o-", label="run (in order)")
    for number, (size, accuracy, _) in enumerate(points, start=1):
        axis.annotate(str(number), (size, accuracy), textcoords="offset points", xytext=(8, 6), fontsize=8)
    best = [p for p in points if champion is not None and p[2] == champion.run_id]
    if best:
        axis.plot([best[0][0]], [best[0][1]], "o", markersize=14, fillstyle="none", color="tab:red",
                  label=f"champion (v{champion.version})")
    axis.set_xscale("log")
    sizes = sorted({p[0] for p in points})
    axis.set_xticks(sizes, [f"{size:,}" for size in sizes])  # the subset sizes themselves, not powers of ten
    axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axis.margins(0.12)  # room for the champion's ring and the run numbers at the edges
    axis.set_xlabel("training images")
    axis.set_ylabel("validation accuracy (last epoch)")
    axis.set_title(f"Retraining on growing subsets: {len(points)} run(s) of the sequence", fontsize=10)
    axis.legend()
    figure.tight_layout()
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "retrain_sequence.png"
        figure.savefig(path, dpi=110)
        store.mlflow_client().log_artifact(run_id, str(path), "figures")
    plt.close(figure)
