"""The command line as a user types it: help, a quickstart run, a sweep that survives a failing job."""

import pytest
from mlflow import MlflowClient

from cnnflow.flows import cli
from conftest import make_idx_folder, tiny_overrides


def test_help_lists_commands_groups_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "train" in text and "components" in text
    assert "celeba, fashion_mnist, fashion_mnist_fast, folder, mnist, mnist_fast, mnist_small, quickstart" in text
    assert "sparse_categorical_crossentropy" in text


def test_train_help_lists_registered_components(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--multirun" in text
    assert "mnist_cnn" in text and "digits, folder, idx, tfds" in text and "confusion_matrix" in text


def test_components_command(capsys):
    assert cli.main(["components", "dataset"]) == 0
    assert capsys.readouterr().out.split() == ["celeba_folder", "digits", "folder", "idx", "tfds"]


def test_sweep_expands_to_the_cartesian_product():
    jobs = cli.sweep_jobs(["experiment=mnist", "seed=1,2", "train.epochs=1,3"])
    assert jobs == [["experiment=mnist", "seed=1", "train.epochs=1"], ["experiment=mnist", "seed=1", "train.epochs=3"],
                    ["experiment=mnist", "seed=2", "train.epochs=1"], ["experiment=mnist", "seed=2", "train.epochs=3"]]
    assert cli.split_experiment(jobs[0]) == ("mnist", ["seed=1", "train.epochs=1"])


def test_a_user_mistake_is_one_line_without_traceback(capsys, mlflow_store):
    assert cli.main(["train", "data=nope"]) == 2
    err = capsys.readouterr().err
    assert "Unknown data config 'nope'; choices for data: celeba, digits" in err and "Traceback" not in err


@pytest.mark.smoke
def test_quickstart_runs_from_the_cli_and_a_configured_prefect_server_records_its_flow_and_tasks(
        prefect_harness, mlflow_store, capsys):
    from prefect.client.orchestration import get_client

    assert cli.main(["train", "train.epochs=1"]) == 0
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(run.data.tags["prefect.flow_run_id"])
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    tasks = {task_run.name.rsplit("-", 1)[0]: task_run.state.type.value for task_run in task_runs}
    assert flow_run.name == "quickstart" and flow_run.state.is_completed()
    assert tasks == {name: "COMPLETED" for name in ("load data", "choose precision", "split", "build model", "train",
                                                    "evaluate", "plot")}


def test_without_a_prefect_server_the_flow_runs_in_process_and_starts_no_server(mlflow_store, monkeypatch, capsys):
    import psutil

    from cnnflow.flows.orchestration import engine

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    before = psutil.Process().children()  # the session's test harness runs a server of its own
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # the session's test harness set one
        assert engine.configured_api_url() is None  # nothing in the environment or the profile
        assert cli.main(["train", "train.epochs=1"]) == 0
    err = capsys.readouterr().err
    assert "train flow runs in this process: no Prefect server is configured" in err and "done: run" in err
    assert "Starting temporary server" not in err  # Prefect says this when it starts one of its own
    assert psutil.Process().children() == before  # no temporary Prefect server was started
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert "prefect.flow_run_id" not in run.data.tags


def test_multirun_survives_a_failing_job_and_summarises(prefect_harness, mlflow_store, tmp_path, capsys):
    idx = make_idx_folder(tmp_path / "idx")
    code = cli.main(["train", "--multirun", "experiment=mnist", *tiny_overrides(idx), "data.valid_size=40,9999"])
    assert code == 1
    out = capsys.readouterr().out
    assert "1/2 jobs succeeded" in out
    assert "ok" in out and "data.valid_size=9999" in out
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("mnist").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FAILED", "FINISHED"]
    assert len({run.data.tags["sweep"] for run in runs}) == 1


def test_pool_commands_without_a_prefect_server_are_one_line_and_start_nothing(mlflow_store, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # the session's test harness set one
        assert cli.main(["deploy", "--pool", "gpu"]) == 5
        assert cli.main(["train", "--pool", "gpu", "seed=1,2", "--multirun"]) == 5
    err = capsys.readouterr().err
    assert "cnnflow: error: cnnflow deploy needs the Prefect server the pool's workers use" in err
    assert "cnnflow: error: cnnflow train --pool needs the Prefect server" in err
    assert "Starting temporary server" not in err
    unreachable = "http://127.0.0.1:9/api"  # nothing listens on port 9
    with temporary_settings({PREFECT_API_URL: unreachable}):
        assert cli.main(["deploy", "--pool", "gpu"]) == 5
    assert capsys.readouterr().err.strip() == (f"cnnflow: error: cnnflow deploy needs the Prefect server {unreachable}, "
                                               f"and it fails: it is unreachable. Start it (prefect server start) or "
                                               f"point PREFECT_API_URL at the one the workers use")
    with pytest.raises(SystemExit) as usage:
        cli.main(["train", "--no-wait", "seed=1"])
    assert usage.value.code == 2 and "--no-wait goes with --pool" in capsys.readouterr().err


def test_a_sweep_id_that_looks_like_a_number_stays_the_id():
    from cnnflow.flows.setup.config import compose_config

    tags = compose_config("quickstart", cli.sweep_tags("7002e071", 3))["tags"]  # 7002e071 reads as 7.002e+74 unquoted
    assert tags == {"sweep": "7002e071", "sweep_job": 3}


def test_cfg_job_prints_the_checked_settings_and_runs_nothing(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--cfg", "job", "experiment=mnist", "train.epochs=2", "data.batch_size=32"]) == 0
    settings = yaml.safe_load(capsys.readouterr().out)
    assert settings["experiment"] == "mnist" and settings["train"]["epochs"] == 2 and settings["data"]["batch_size"] == 32
    assert cli.main(["search", "--cfg", "all", "experiment=mnist", "model.dropout_rate=interval(0.1,0.4)"]) == 0
    search = yaml.safe_load(capsys.readouterr().out)["search"]
    assert search["space"] == {"model.dropout_rate": "interval(0.1,0.4)"} and search["trials"] == 20
    assert cli.main(["train", "--cfg", "job", "train.epochz=2"]) == 2
    assert capsys.readouterr().err.strip() == "cnnflow: error: unknown setting train.epochz; did you mean train.epochs?"
    assert list(tmp_path.iterdir()) == []  # nothing ran: no store, no outputs


def test_a_run_id_prefix_of_any_length_is_matched_or_answered_honestly(mlflow_store):
    from cnnflow.components.errors import RunError
    from cnnflow.flows.tracking import store

    client = MlflowClient()
    experiment = client.create_experiment("prefixes")
    ids = [client.create_run(experiment).info.run_id for _ in range(17)]  # 17 ids, 16 hex digits: two share one
    for run_id in ids:  # the shortest prefix only this run has, however short, is this run
        prefix = next(run_id[:n] for n in range(1, 33) if sum(o.startswith(run_id[:n]) for o in ids) == 1)
        assert store.full_run_id(prefix) == run_id
    first = next(c for c in "0123456789abcdef" if sum(o.startswith(c) for o in ids) >= 2)
    with pytest.raises(RunError, match=rf"run id '{first}' is ambiguous: {sum(o.startswith(first) for o in ids)} runs "
                                       rf"start with it \("):
        store.full_run_id(first)
    absent = next(p for p in (f"{a}{b}{c}" for a in "0123456789abcdef" for b in "0123456789abcdef" for c in "01")
                  if not any(o.startswith(p) for o in ids))
    with pytest.raises(RunError, match=rf"no run '{absent}' in the MLflow store"):
        store.full_run_id(absent)


@pytest.mark.slow
def test_help_shows_no_tensorflow_start_up_lines():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}  # as a user's shell has it
    for command in (["train", "--help"], ["components"]):
        out = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", *command], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and "mnist_cnn" in out.stdout
        assert "I0000" not in out.stderr and "absl" not in out.stderr, out.stderr


def test_a_value_hydra_cannot_read_is_answered_with_how_to_quote_it(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--cfg", "job", "data.path=/data/a b/é"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith("""quote it: "data.path='/data/a b/é'\"""") and "\\n" not in error, error
    assert cli.main(["train", "--cfg", "job", "data.path='/data/a b/é'"]) == 0  # as the hint says
    assert yaml.safe_load(capsys.readouterr().out)["data"]["path"] == "/data/a b/é"


def test_a_model_that_cannot_learn_the_data_is_refused_by_cfg_job_and_by_train_before_any_run(
        idx_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # absolute: one store per URI in a process
    mismatch = ["experiment=mnist", "model=celeba_cnn", "data.source=idx", f"data.path={idx_folder}"]
    expected = ("cnnflow: error: model=celeba_cnn cannot learn data.source=idx 'mnist': the data has 10 classes, and "
                "the model's number of classes should be")
    assert cli.main(["train", "--cfg", "job", *mismatch]) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert cli.main(["train", *mismatch, "train.epochs=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(expected)
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_a_section_that_does_not_exist_is_named_with_how_to_add_a_key_of_ones_own(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--cfg", "job", "nosuchgroup.key=1"]) == 2
    error = capsys.readouterr().err.strip()
    assert "the settings have no section nosuchgroup (the top level takes: data, experiment," in error
    assert error.endswith("+nosuchgroup.key=VALUE adds a key of your own where a section takes them, as in +tags.owner=me")


def test_a_reader_that_stops_early_ends_the_listing_quietly_and_a_negative_limit_is_refused(mlflow_store, capsys):
    import subprocess
    import sys

    client = MlflowClient()
    experiment = client.create_experiment("many")
    for _ in range(150):  # more than a pipe holds before its reader must read
        client.create_run(experiment)
    runs = subprocess.Popen([sys.executable, "-m", "cnnflow.flows.cli", "runs", "--limit", "150"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    runs.stdout.close()  # as `cnnflow runs | true`: the reader has gone before anything is written
    assert runs.wait(timeout=120) == 141 and runs.stderr.read() == b""  # 128 + SIGPIPE, no traceback
    with pytest.raises(SystemExit) as refused:
        cli.main(["runs", "--limit", "-1"])
    assert refused.value.code == 2 and "argument --limit: '-1': give a whole number of at least 1" in capsys.readouterr().err


def test_a_data_cache_folder_that_cannot_be_written_is_one_line_exit_5_before_any_run(idx_folder, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # absolute: one store per URI in a process
    (tmp_path / "home").write_text("HOME is a file here")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.main(["train", "experiment=mnist", "data.source=idx", f"data.path={idx_folder}", "data.cache=disk"]) == 5
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cnnflow: error: data.cache=disk: cannot write the data cache folder {tmp_path}/home/.cache/cnnflow/tf.data "
        f"(Not a directory); set data.cache_dir to a folder you can write, or data.cache=memory")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


@pytest.mark.parametrize("command", [["train", "experiment=quickstart", "train.epochs=1"], ["serve"]])
def test_a_prefect_server_that_does_not_answer_is_one_line_exit_5_within_seconds(command, tmp_path):
    """PREFECT_API_URL set and nothing listening: said at once, not after minutes of retries; no run made."""
    import os
    import subprocess
    import sys
    import time

    from conftest import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api", PREFECT_HOME=str(tmp_path / ".prefect"))
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cnnflow.flows.cli", *command], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 5 and time.monotonic() - began < 60, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("cnnflow: error: ") and f"the Prefect server {env['PREFECT_API_URL']}" in last, done.stderr
    assert "Traceback" not in done.stderr
    if (tmp_path / "mlflow.db").exists():
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_runs_shows_a_searchs_best_trial_its_epochs_and_its_test_accuracy(mlflow_store):
    from cnnflow.flows import runs
    from cnnflow.flows.tracking import store

    client = MlflowClient()
    experiment = client.create_experiment("mnist")
    parent = client.create_run(experiment, tags={"search.study": "mnist-1a2b3c4d", "search.best_trial": "3",
                                                 "search.best_params": "optimizer.learning_rate=0.002"}).info.run_id
    store.log_metrics(parent, {"best_val_accuracy": 0.9312, "best_test_accuracy": 0.9288, "epochs_spent": 41})
    client.set_terminated(parent, "FINISHED")
    [row] = runs.runs_table().splitlines()[1:]
    assert row.split()[:3] == [parent[:8], "mnist", "FINISHED"]
    assert row.split()[5:] == ["search", "-", "-", "-", "41", "0.9312", "0.9288", "search,", "best", "trial", "3:",
                               "optimizer.learning_rate=0.002"]
