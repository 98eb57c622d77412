"""Pruning through the MLflow store alone, so a trial may train on any worker: the trainer's
callback (`Verdicts`) writes each epoch's metrics to its run's tag and waits for the verdict that
the search's `Judge` thread writes after asking the study's pruner."""

from __future__ import annotations

import json
import math
import threading
import time
from typing import Any

from cnnflow.components import compat
from cnnflow.components.errors import described, is_defect
from cnnflow.flows.search.space import Plan
from cnnflow.flows.search.study import states
from cnnflow.flows.tracking import store
from cnnflow.flows.tracking.names import PARENT_RUN, REPORT_TAG, SEARCH, SEARCH_TRIAL, STATE_TAG, VERDICT_TAG

VERDICT_SECONDS = 60.0  # how long a trainer waits for a verdict before it trains on without one
JUDGE_SECONDS = 1.0  # how often the judge reads the trials' reports
CHANCE_MARGIN = 0.005  # a trial this close to always answering the most common class has learnt nothing


class Judge:
    """The search's side of pruning: every JUDGE_SECONDS it reads the reports of the study's running
    trial runs in MLflow, reports each new epoch to the study, and writes the pruner's verdict. It
    also makes each trial run a child of the search's run."""

    def __init__(self, study, plan: Plan, parent_run_id: str, logger):
        self.study, self.plan, self.parent, self.logger = study, plan, parent_run_id, logger
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cnnflow-search-judge", daemon=True)
        self._failing = False

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        # bounded: in an outage a call of the judge's can sit in MLflow's retries for minutes, and its
        # verdicts would concern trials this search no longer runs (it is a daemon thread)
        self._thread.join(timeout=10 * JUDGE_SECONDS)

    def _loop(self) -> None:
        while not self._stop.wait(JUDGE_SECONDS):
            try:
                self.judge_reports()
                if self._failing:
                    self.logger.info("search: the judge reaches the MLflow store again")
                self._failing = False
            except Exception as error:  # a store outage (or a bug, named): the trainers train on meanwhile
                if not self._failing:
                    self.logger.warning(f"search: cannot read the trials' reports ({described(error)}); "
                                        f"trials train on without verdicts until the store answers")
                self._failing = True

    def judge_reports(self) -> None:
        import mlflow

        client = store.mlflow_client()
        runs = mlflow.search_runs([store.experiment_id(self.plan.cfg)], output_format="list",
                                  filter_string=f"tags.{SEARCH} = '{self.plan.study_name}' and attributes.status = 'RUNNING'")
        for run in runs:
            tags = run.data.tags
            if tags.get(PARENT_RUN) != self.parent:
                client.set_tag(run.info.run_id, PARENT_RUN, self.parent)
            reported = json.loads(tags.get(REPORT_TAG) or "null")
            judged = json.loads(tags.get(VERDICT_TAG) or "null")
            if not reported or (judged and judged["epoch"] >= reported["epoch"]):
                continue
            prune, why = self.verdict(int(tags[SEARCH_TRIAL]), reported["epoch"], reported["logs"],
                                      reported.get("chance") or {})
            if prune is not None:
                client.set_tag(run.info.run_id, VERDICT_TAG,
                               json.dumps({"epoch": reported["epoch"], "prune": prune, "why": why}))

    def verdict(self, number: int, epoch: int, logs: dict[str, float],
                chance: dict[str, float]) -> tuple[bool | None, str]:
        """Whether trial `number` stops after `epoch`, and why (None: it is no longer running). A trial
        that learns nothing (at chance level) or diverges stops whatever the pruner's brackets say: with
        few trials, a bracket may hold nobody to compare it with."""
        import optuna

        trial_id = compat.trial_id(self.study, number)
        frozen = compat.stored_trial(self.study, trial_id)
        if frozen.state != states().RUNNING:
            return None, ""
        trial = optuna.trial.Trial(self.study, trial_id)
        value = logs.get(self.plan.search["metric"])
        if value is None:
            return False, ""
        if epoch not in frozen.intermediate_values and math.isfinite(value):
            trial.report(value, epoch)
        hopeless = hopeless_because(logs, chance)
        if hopeless:
            return True, hopeless
        return bool(trial.should_prune()), "weaker than its peers were at this epoch"  # numpy's bool, from some pruners


def diverged_trial(run_id: str, where: dict[str, Any]) -> None:
    """A trial whose training diverged is pruned at that epoch, not failed: its values are a region of
    the space the sampler learns to avoid (Optuna's samplers learn from pruned trials, not from failed
    ones), and it is no failure of the search's to count towards stopping it."""
    store.set_tags(run_id, {
        STATE_TAG: f"pruned at epoch {where['epoch']}: diverged (the loss became {where['loss']:.4g} at batch "
                   f"{where['batch']})",
        REPORT_TAG: json.dumps({"epoch": where["epoch"], "logs": {}})})


def hopeless_because(logs: dict[str, float], chance: dict[str, float]) -> str:
    """Why a trial's epoch says it will not learn (its loss not finite, or validation no better than
    always answering the most common class), or ""."""
    broken = sorted(name for name, value in logs.items() if not math.isfinite(value))
    if broken:
        return f"diverged ({', '.join(f'{name} {logs[name]}' for name in broken)})"
    # on training and validation both: validation alone may sit at chance while training learns (a batch
    # normalisation whose moving statistics lag after an epoch of few steps), and comes up later
    majority = chance.get("val_accuracy")
    accuracies = [logs[name] for name in ("val_accuracy", "accuracy") if name in logs]
    if majority is not None and accuracies and all(value <= majority + CHANCE_MARGIN for value in accuracies):
        shown = ", ".join(f"{name} {logs[name]:.4f}" for name in ("accuracy", "val_accuracy") if name in logs)
        return f"at chance level ({shown}; always answering the most common class gives {majority:.4f})"
    return ""


class Verdicts:
    """The trainer's side of pruning, as a Keras callback (flows/train.py adds it to a trial's
    training): at each epoch end the epoch's metrics go to the run's tag `search.report`; then it
    waits for the judge's verdict on that epoch, and a `prune` stops the training after it."""

    def __init__(self, run_id: str, last_epoch: int, logger, chance: dict[str, float] | None = None,
                 wait: float = VERDICT_SECONDS):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(inner, epoch, logs=None):
                if self.pruned_after(epoch + 1, logs or {}):
                    inner.model.stop_training = True

        self.callback = Callback()
        self.run_id, self.last_epoch, self.logger, self.wait = run_id, last_epoch, logger, wait
        self.chance = chance or {}  # what validation gives without learning (flows/train.py measures it)

    def pruned_after(self, epoch: int, logs: dict[str, Any]) -> bool:

        client = store.mlflow_client()
        try:
            client.set_tag(self.run_id, REPORT_TAG, json.dumps({"epoch": epoch, "chance": self.chance, "logs": {
                name: float(value) for name, value in logs.items()}}))
        except Exception as error:  # the store is out: the outbox keeps the training's own writes
            self.logger.warning(f"search: could not report epoch {epoch} ({described(error)}); training on")
            return False
        if epoch >= self.last_epoch:
            return False
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:
            try:
                verdict = json.loads(client.get_run(self.run_id).data.tags.get(VERDICT_TAG) or "null")
                if verdict and verdict["epoch"] >= epoch:
                    if verdict["prune"]:
                        why = verdict.get("why") or "weaker than its peers were at this epoch"
                        client.set_tag(self.run_id, STATE_TAG, f"pruned at epoch {epoch}: {why}")
                        self.logger.info(f"search: pruned after epoch {epoch}: {why}")
                    return bool(verdict["prune"])
            except Exception as error:  # the store is out: the wait below bounds it
                if is_defect(error):
                    raise
            time.sleep(0.3)
        self.logger.warning(f"search: no verdict on epoch {epoch} within {self.wait:.0f} s (is the search command "
                            f"running?); training on, and waiting at most 5 s from now on")
        self.wait = 5.0
        return False


