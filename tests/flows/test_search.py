"""`cnnflow search`: the space grammar and its refusals, pruning at an epoch end, the parent run with
its child trials and the one test evaluation, and a killed search that continues its study."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from cnnflow.components.errors import SettingsError
from cnnflow.flows import cli
from cnnflow.flows.search import flow as searching, pruning, space
from cnnflow.flows.search import study as studies
from cnnflow.flows.tracking import names
from conftest import tiny_overrides

SPACE = ["model.dropout_rate=interval(0.0,0.5)", "optimizer.learning_rate=tag(log,interval(1e-4,1e-2))"]


def test_the_sweep_grammar_becomes_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    assert space.distribution("model.width", "int(interval(16,64))") == IntDistribution(16, 64)
    assert space.distribution("optimizer.learning_rate", "tag(log,interval(1e-4,1e-2))") == \
        FloatDistribution(1e-4, 1e-2, log=True)
    assert space.distribution("data.batch_size", "choice(64,128,256)") == CategoricalDistribution([64, 128, 256])
    assert space.distribution("seed", "1,2,3") == CategoricalDistribution([1, 2, 3])
    assert space.distribution("model.width", "range(16,65,16)") == IntDistribution(16, 64, step=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna warns of bounds off the step; the range's own last value is none
        assert space.distribution("model.width", "range(16,32,8)") == IntDistribution(16, 24, step=8)
        assert space.distribution("model.dropout_rate", "range(0.1,0.5,0.1)").high == pytest.approx(0.4)
    assert space.distribution("model.dropout_rate", "interval(0,0.5)") == FloatDistribution(0.0, 0.5)


def test_a_sampled_value_becomes_the_override_that_sets_it():
    assert space.as_override("model.width", 41) == "model.width=41"
    assert space.as_override("optimizer.learning_rate", 0.004312) == "optimizer.learning_rate=0.004312"
    assert space.as_override("model", "fast_cnn") == "model=fast_cnn"
    assert space.as_override("data.path", "/data/a b") == "data.path='/data/a b'"


@pytest.mark.parametrize("overrides, message", [
    (["model.width=int(interval(16,"], r"^model.width=int\(interval\(16,: "),
    (["model.widht=int(interval(16,64))"], r"unknown setting model.widht; did you mean model.width\?"),
    (["model.dropout_rate=interval(0.5,1.5)"], r"^model.dropout_rate=1.5: should be less than 1"),
    (["data.batch_size=choice(64,0)"], r"^data.batch_size=0: should be greater than or equal to 1"),
    (["model.width=int(interval(64,16))"], r"^model.width=int\(interval\(64,16\)\): .*low"),
    (["model.width=range(32,16,8)"], r"^model.width=range\(32,16,8\): range\(start,stop,step\) counts up .* needs "
                                     r"start < stop"),
    ([], r"search needs a space"),
    ([*SPACE, "search.trials=null"], r"set a budget"),
    ([*SPACE, "search.metric=test_accuracy"], r"^search.metric='test_accuracy': should be a validation metric"),
    ([*SPACE, "search.metric=val_auc"], r"the trials record val_loss and val_<m> for train.metrics=\['accuracy'\]"),
    ([*SPACE, "search.pruner=asha"], r"^search.pruner='asha': should be 'hyperband', 'successive_halving'"),
    ([*SPACE, "search.trails=3"], r"unknown setting search.trails; did you mean search.trials\?"),
    ([*SPACE, "search.trials=0"], r"^search.trials=0: should be greater than or equal to 1"),
    ([*SPACE, "search.epochs=0"], r"^search.epochs=0: should be greater than or equal to 1"),
    ([*SPACE, "search.direction=up"], r"^search.direction='up': should be 'max' or 'min'"),
    ([*SPACE, "search.sampler=grid"], r"^search.sampler='grid': should be 'tpe' or 'random'"),
    ([*SPACE, "search.startup_trials=-1"], r"^search.startup_trials=-1: should be greater than or equal to 0"),
    ([*SPACE, "search.seed=-1"], r"^search.seed=-1: should be greater than or equal to 0"),
    ([*SPACE, "search.name='a b'"], r"^search.name='a b': should be letters, digits, _, . and -"),
    ([*SPACE, "search.storage=''"], r"^search.storage='': should have at least 1 character"),
    ([*SPACE, "search.parallel=0"], r"^search.parallel=0: should be greater than or equal to 1"),
    ([*SPACE, "search.storage=nosuchdb://x"], r"^search.storage=nosuchdb://x: cannot open it as an Optuna storage"),
    ([*SPACE, "search=nosuch"], r"Unknown search config 'nosuch'|Could not find 'search/nosuch'"),
])
def test_a_bad_space_or_search_setting_is_one_line_exit_2_and_creates_nothing(overrides, message, tmp_path,
                                                                              monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SettingsError, match=message):
        space.planned("mnist", overrides)
    assert cli.main(["search", "experiment=mnist", *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cnnflow: error: ") and "\n" not in error and "Traceback" not in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no optuna.db, no mlflow.db, no outputs


def test_each_search_file_composes_with_every_bound_checked():
    from cnnflow.flows.setup.config import choices

    for name in choices("search"):
        plan = space.planned("fashion_mnist_fast", [f"search={name}"] + (["model.width=choice(16,32)"]
                                                                         if name == "default" else []))
        assert plan.space and (plan.search["trials"] or plan.search["epochs"])
        # the median rule by default (docs/search.md: measured); the benchmark's search keeps what it was measured with
        assert plan.search["pruner"] == {"default": "median", "fashion_mnist_fast": "hyperband"}[name]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_continued_search_draws_on_instead_of_drawing_its_first_values_again(sampler, mlflow_store):
    """A new process opens the study with the same search.seed: its sampler must not repeat the
    values the first process already trained (a benchmark search stopped after one trial and run
    again trained the same width, rate and batch twice)."""
    plan = space.planned("mnist", [f"search.sampler={sampler}", "model.dropout_rate=interval(0.0,0.9)",
                                    "optimizer.learning_rate=tag(log,interval(1e-4,1e-1))"])
    first = studies.opened_study(plan)
    drawn = first.ask(plan.space)
    first.tell(drawn, 0.5)
    again = studies.opened_study(plan)  # as the same command in a new process opens it
    assert again.ask(plan.space).params != drawn.params
    fresh = optuna.create_study(sampler=studies._sampler(plan.search, 0))
    assert fresh.ask(plan.space).params == drawn.params  # a new study still starts where the seed says
    next_seed = optuna.create_study(sampler=studies._sampler(plan.search | {"seed": plan.search["seed"] + 1}, 0))
    assert next_seed.ask(plan.space).params != again.trials[-1].params  # another seed is another search


@pytest.mark.slow
def test_a_pruned_trial_stops_at_an_epoch_end_and_the_best_alone_is_tested(prefect_harness, mlflow_store,
                                                                           idx_folder, tmp_path):
    # float32: with op determinism a training repeats itself exactly (mixed bfloat16 need not on a CPU
    # whose oneDNN kernels vary with load: one run here gave the third trial 0.925 against 1.0)
    overrides = [*tiny_overrides(idx_folder, epochs=3), "search.trials=3", "search.pruner=median",
                 "search.startup_trials=1", "optimizer.learning_rate=choice(0.003,1e-9)", "runtime.precision=float32"]
    plan = space.planned("mnist", overrides)
    study = studies.opened_study(plan)
    # a rate that learns nothing comes second: the median pruner stops it. The third trial draws the
    # first one's values: a training of its own, as good as the first at every epoch, so not pruned.
    for rate in (0.003, 1e-9, 0.003):
        study.enqueue_trial({"optimizer.learning_rate": rate}, skip_if_exists=False)

    result = searching.search_flow("mnist", overrides)

    trials = optuna.load_study(study_name=plan.study_name, storage=plan.storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert trials[1].intermediate_values.keys() == {1} and trials[0].intermediate_values.keys() == {1, 2, 3}
    client = MlflowClient()
    runs = {int(r.data.tags["search_trial"]): r for r in mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.search = '{plan.study_name}'")}
    assert sorted(runs) == [0, 1, 2]
    # training and validation both at chance (pruning.hopeless_because)
    assert runs[1].data.tags[names.STATE_TAG].startswith("pruned at epoch 1: at chance level (accuracy ")
    assert "val_accuracy" in runs[1].data.tags[names.STATE_TAG]
    assert [m.step for m in client.get_metric_history(runs[1].info.run_id, "loss")] == [1]  # stopped after epoch 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == [1, 2, 3]
    assert {r.data.tags[names.STATE_TAG] for i, r in runs.items() if i != 1} == {"complete"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {result["run_id"]}
    assert all(r.data.params["train.test"] == "False" and not any(k.startswith("test_") for k in r.data.metrics)
               for r in runs.values())  # trials never look at the test split
    best = max((0, 2), key=lambda i: runs[i].data.metrics["val_accuracy"])
    assert result["best_run"] == runs[best].info.run_id and result["params"] == trials[best].params
    evaluations = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                     filter_string="tags.evaluation_of != ''")
    assert [e.data.tags["evaluation_of"] for e in evaluations] == [result["best_run"]]  # tested once, the best
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_test_accuracy"] == evaluations[0].data.metrics["eval_accuracy"]
    assert parent.data.params["space.optimizer.learning_rate"] == "choice(0.003,1e-9)"
    assert parent.data.metrics["epochs_spent"] == 3 + 1 + 3 and parent.data.metrics["trials_pruned"] == 1
    assert {a.path for a in client.list_artifacts(result["run_id"], "figures")} == \
        {"figures/best_so_far.png", "figures/parameters.png"}
    table = json.loads(Path(client.download_artifacts(result["run_id"], "trials.json", str(tmp_path))).read_text())
    assert table["data"][0][0] == best and len(table["data"]) == 3

    again = searching.search_flow("mnist", overrides)  # the same command once the budget is spent: nothing new
    assert again["run_id"] == result["run_id"] and again["trials"] == 3
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.evaluation_of != ''")) == 1


@pytest.mark.slow
def test_an_epoch_budget_is_never_overrun(prefect_harness, mlflow_store, idx_folder):
    overrides = [*tiny_overrides(idx_folder, epochs=2), "search.trials=null", "search.epochs=5",
                 "search.pruner=none", "model.dropout_rate=choice(0.1,0.2,0.3)"]
    result = searching.search_flow("mnist", overrides)
    plan = space.planned("mnist", overrides)
    trials = optuna.load_study(study_name=plan.study_name, storage=plan.storage).trials
    assert [t.user_attrs["epochs_trained"] for t in trials] == [2, 2, 1]  # the last trial gets what is left
    assert result["epochs_spent"] == 5


def _search_command(idx: Path, cwd: Path) -> list[str]:
    return [sys.executable, "-m", "cnnflow.flows.cli", "search", "experiment=mnist",
            *tiny_overrides(idx, epochs=4), "search.trials=2", "search.pruner=none",
            "model.dropout_rate=choice(0.1,0.3)"]


@pytest.mark.slow
def test_a_search_killed_mid_trial_continues_its_study_and_counts_no_trial_twice(tmp_path, idx_folder):
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PREFECT_HOME=str(tmp_path / ".prefect"))
    work = tmp_path / "work"
    work.mkdir()
    first = subprocess.Popen(_search_command(idx_folder, work), cwd=work, env=env, text=True, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not any((run / "checkpoint-epoch0002.json").exists() for run in work.glob("outputs/mnist/*")):
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the search and its training die at once, mid-trial
    first.communicate(timeout=30)

    second = subprocess.run(_search_command(idx_folder, work), cwd=work, env=env, text=True, timeout=600,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert second.returncode == 0, second.stdout
    assert "taking up trial 0" in second.stdout and "continuing study" in second.stdout, second.stdout

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    studies = optuna.get_all_study_summaries(f"sqlite:///{work / 'optuna.db'}")
    assert len(studies) == 1
    trials = optuna.load_study(study_name=studies[0].study_name, storage=f"sqlite:///{work / 'optuna.db'}").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.search = '{studies[0].study_name}'")
    assert sorted(r.data.tags["search_trial"] for r in runs) == ["0", "1"]  # trial 0 resumed, not run again
    for run in runs:
        assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`search.study` != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_only_a_server_outage_holds_a_trial_and_a_failure_of_its_own_is_its_own(tmp_path, caplog):
    """A download's ConnectionError is the trial's failure, raised at once; an MLflow call that found
    no server is tried again once the store answers (here at once: a SQLite store)."""
    import logging
    import types

    from mlflow.exceptions import MlflowException

    plan = types.SimpleNamespace(cfg={"train": {"outage_timeout": 30}, "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"})
    logger = logging.getLogger("search-test")

    def download():
        raise ConnectionError("connection reset by peer")

    with pytest.raises(ConnectionError):
        searching._riding_out_outages(plan, logger, download)

    calls = []

    def blipped():
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("API request failed") from ConnectionError("Connection refused")
        return "told"

    with caplog.at_level(logging.WARNING, "search-test"):
        assert searching._riding_out_outages(plan, logger, blipped) == "told"
    assert len(calls) == 2 and "answers again" in caplog.text


def _together(commands: list[list[str]], cwd: Path, env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """The commands started at the same moment, each as its own process; their outcomes."""
    started = [subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for command in commands]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), *p.communicate()) for p in started]


def search_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    return env | {"TF_CPP_MIN_LOG_LEVEL": "2", "PREFECT_HOME": str(tmp_path / ".prefect")}


def test_two_identical_searches_at_once_make_one_study_one_parent_and_one_refusal(tmp_path, idx_folder):
    """Started together in a fresh folder (no optuna.db, no mlflow.db yet): one searches, the other
    says who does in one line and exits 4; the study has one parent run, its trial one child run."""
    work = tmp_path / "work"
    work.mkdir()
    command = [sys.executable, "-m", "cnnflow.flows.cli", "search", "experiment=mnist", *tiny_overrides(idx_folder),
               "search.trials=1", "search.pruner=none", "model.dropout_rate=choice(0.1,0.3)"]
    outcomes = _together([command, command], work, search_env(tmp_path))

    assert sorted(o.returncode for o in outcomes) == [0, 4], [o.stderr[-3000:] for o in outcomes]
    refused = next(o for o in outcomes if o.returncode == 4)
    searched = next(o for o in outcomes if o.returncode == 0)
    assert ": 1 trial (0 pruned), 1 epoch; MLflow run" in searched.stdout, searched.stdout  # counted as said
    [line] = [line for line in refused.stderr.splitlines() if line.startswith("cnnflow: error:")]
    assert "is being searched by process" in line and "the same command then continues the study" in line, line
    assert "Traceback" not in refused.stderr
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`search.study` != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["budget.trials"] == "1" and parents[0].data.params["budget.epochs_per_trial"] == "1"
    trials = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.search != ''")
    assert [t.info.run_name for t in trials] == [f"{parents[0].data.tags['search.study']}-trial-0"]
    tested = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.evaluation_of != ''")
    assert len(tested) == 1  # the test split evaluated once
    running = mlflow.search_runs(search_all_experiments=True, output_format="list", run_view_type=3,
                                 filter_string="attributes.status = 'RUNNING'")
    assert running == []  # the lock's bookkeeping runs included


def test_a_trial_at_chance_level_or_diverging_is_stopped_at_its_first_report_whatever_its_bracket():
    """With few trials Hyperband's brackets compare a trial with almost nobody: a learning rate that
    learns nothing (0.099 on ten classes) trained on while good trials were pruned."""
    from types import SimpleNamespace

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.HyperbandPruner(min_resource=1,
                                                                                            max_resource=3))
    judge = pruning.Judge(study, SimpleNamespace(search={"metric": "val_accuracy"}), "parent", logger=None)
    chance = {"val_accuracy": 0.113}
    for _ in range(3):
        study.ask()
    prune, why = judge.verdict(0, 1, {"accuracy": 0.101, "val_accuracy": 0.099, "val_loss": 2.30}, chance)
    assert prune and why == ("at chance level (accuracy 0.1010, val_accuracy 0.0990; always answering the most "
                             "common class gives 0.1130)")
    prune, why = judge.verdict(1, 1, {"val_accuracy": 0.5, "val_loss": float("nan")}, chance)
    assert prune and why == "diverged (val_loss nan)"
    prune, why = judge.verdict(2, 1, {"val_accuracy": 0.93, "val_loss": 0.2}, chance)
    assert not prune and why == "weaker than its peers were at this epoch"  # the pruner's to say, and it keeps it
    assert study.trials[0].intermediate_values == {1: 0.099} and study.trials[1].intermediate_values == {1: 0.5}
    assert pruning.hopeless_because({"val_accuracy": 0.125}, chance) == ""  # a little better than chance: learning
    # validation at chance while training learns: a lagging batch normalisation after few steps, not hopeless
    assert pruning.hopeless_because({"accuracy": 0.71, "val_accuracy": 0.096}, chance) == ""


@pytest.mark.smoke
def test_a_diverged_trial_is_pruned_not_failed_so_the_search_goes_on(mlflow_store, idx_folder):
    """A learning rate that diverges is a result about the space (the sampler learns from pruned
    trials, not failed ones), and three of them in a row do not stop the search as failures would."""
    overrides = [*tiny_overrides(idx_folder), "search.trials=4", "search.pruner=none", "runtime.precision=float32",
                 "optimizer.learning_rate=choice(0.003,1e6)"]
    plan = space.planned("mnist", overrides)
    study = studies.opened_study(plan)
    for rate in (1e6, 1e6, 1e6, 0.003):
        study.enqueue_trial({"optimizer.learning_rate": rate}, skip_if_exists=False)

    result = searching.search_flow("mnist", overrides)

    trials = optuna.load_study(study_name=plan.study_name, storage=plan.storage).trials
    assert [t.state.name for t in trials] == ["PRUNED", "PRUNED", "PRUNED", "COMPLETE"]
    assert result["best_trial"] == 3 and result["pruned"] == 3
    runs = {int(r.data.tags["search_trial"]): r for r in mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.search = '{plan.study_name}'")}
    assert runs[0].data.tags[names.STATE_TAG].startswith("pruned at epoch 1: diverged (the loss became ")
    assert trials[0].user_attrs["epochs_trained"] == 1
