"""`cnnflow runs`: recent runs side by side in a terminal, read from the MLflow store."""

from __future__ import annotations

import datetime

from cnnflow.components.errors import RunError
from cnnflow.flows.tracking import names, store
from cnnflow.flows.tracking.lifecycle import closed_if_abandoned
from cnnflow.flows.tracking.store import LOCKS_EXPERIMENT

COLUMNS = ("run", "experiment", "status", "started", "model", "precision", "train", "data", "epochs", "best val_acc",
           "test_acc", "overrides")


def _row(run, experiment_names: dict[str, str]) -> list[str]:

    params, tags, metrics = run.data.params, run.data.tags, run.data.metrics
    history = store.mlflow_client().get_metric_history(run.info.run_id, "val_accuracy")
    started = datetime.datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
    overrides = params.get("overrides", "").strip("[]").replace("'", "")
    if tags.get(names.EVALUATION_OF):
        overrides = f"evaluation of {tags[names.EVALUATION_OF][:8]} on {tags.get(names.EVALUATED_SPLIT)}"
    if tags.get(names.SEARCH_STUDY):  # a search: its best trial's numbers
        best = metrics.get("best_val_accuracy")
        overrides = (f"search, best trial {tags[names.SEARCH_BEST_TRIAL]}: {tags.get(names.SEARCH_BEST_PARAMS, '')}"
                     if names.SEARCH_BEST_TRIAL in tags else "search, no trial complete yet")
        return [run.info.run_id[:8], experiment_names.get(run.info.experiment_id, "?"), run.info.status, started,
                "search", "-", "-", "-", f"{int(metrics['epochs_spent'])}" if "epochs_spent" in metrics else "-",
                f"{best:.4f}" if best is not None else "-",
                f"{metrics['best_test_accuracy']:.4f}" if "best_test_accuracy" in metrics else "-", overrides[:60]]
    return [
        run.info.run_id[:8], experiment_names.get(run.info.experiment_id, "?"), run.info.status, started,
        params.get("model.name", "-"), _precision(params), tags.get(names.split_size("train"), "-"),
        # what it trained (or evaluated) on: the fingerprint's first digits, as MLflow's Datasets column shows it
        (tags.get(names.data_fingerprint("train")) or tags.get(names.EVALUATED_FINGERPRINT) or "-")[:12],
        str(max((m.step for m in history), default=0) or "-"),
        f"{max(m.value for m in history):.4f}" if history else "-",
        f"{metrics['test_accuracy']:.4f}" if "test_accuracy" in metrics else
        f"{metrics['eval_accuracy']:.4f}" if "eval_accuracy" in metrics else "-",
        overrides[:60],
    ]


def _precision(params: dict[str, str]) -> str:
    """`bfloat16 (auto 1.47x)`: the precision a run trained in and, briefly, why (its param precision.why says it all)."""
    used = params.get("runtime.precision")
    if not used:
        return "-"
    short = used.removeprefix("mixed_")
    return f"{short} ({params[names.PRECISION_BASIS]})" if names.PRECISION_BASIS in params else short


def runs_table(experiment: str | None = None, limit: int = 20) -> str:
    """The `limit` newest runs of one MLflow experiment (or all), one line each."""
    import mlflow

    store.use_store({}, must_exist=True)
    experiments = mlflow.search_experiments()
    names = {e.experiment_id: e.name for e in experiments if e.name != LOCKS_EXPERIMENT}  # cnnflow's own bookkeeping
    if experiment and experiment not in names.values():
        raise RunError(f"no MLflow experiment {experiment!r} in {store.tracking_uri({})}; "
                       f"there are: {', '.join(sorted(names.values())) or 'none'}")
    ids = [i for i, name in names.items() if experiment in (None, name)]
    runs = mlflow.search_runs(ids, output_format="list", order_by=["attributes.start_time DESC"], max_results=limit)
    # a run whose process is gone is not shown (or left) RUNNING
    runs = [store.mlflow_client().get_run(run.info.run_id) if closed_if_abandoned(run) else run for run in runs]
    if not runs:
        return f"no runs in {store.tracking_uri({})}"
    rows = [list(COLUMNS)] + [_row(run, names) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def recorded_split(run_id: str):
    """The split a run recorded (split.npz, from its folder or its artifacts): positions and fingerprints."""
    from cnnflow.components.data import Split

    _, folder = store.run_settings(run_id)
    return Split.load(store.run_file(run_id, folder, "split.npz"))


def data_diff(first: str, second: str) -> str:
    """`cnnflow data diff A B`: per role, how many examples B added, removed or changed against A (each
    example named by its place in its partition and compared by its bytes), and whether the test
    split is the same."""
    store.use_store({}, must_exist=True)
    ids = [store.full_run_id(reference) for reference in (first, second)]
    before, after = (recorded_split(run_id) for run_id in ids)
    from cnnflow.components.data import changes

    rows = [("role", f"{ids[0][:8]}", f"{ids[1][:8]}", "added", "removed", "changed", "kept")]
    for role in after.indices:
        if role not in before.indices:
            continue
        found = changes(before, after, role)
        rows.append((role, f"{len(before.indices[role]):,}", f"{len(after.indices[role]):,}",
                     *(f"{found[key]:,}" for key in ("added", "removed", "changed", "kept"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in rows]
    same_test = before.fingerprints.get("test") == after.fingerprints.get("test")
    lines.append(f"test split: {'the same' if same_test else 'DIFFERENT'} ({before.fingerprints.get('test', '?')[:16]}"
                 + ("" if same_test else f" -> {after.fingerprints.get('test', '?')[:16]}") + ")")
    return "\n".join(lines)
