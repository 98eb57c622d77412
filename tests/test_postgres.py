"""PostgreSQL as a team's MLflow backend and Optuna storage (marked `cluster`: .ci/run installs
Debian's postgresql and runs it after the default suite). Two identical searches started together
from two folders, as two machines sharing the store would: one study, one parent run, one refusal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy

from conftest import free_port, kill_tree, make_idx_folder, tiny_overrides, wait_until

pytestmark = pytest.mark.cluster

BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, its commands run as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of the test's own (a fresh cluster on a free loopback port), with the
    databases `mlflow` and `optuna`; yields the URL without a database name."""
    if not BIN:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    # pytest's temporary folders are the current user's alone; the server's must be postgres's
    root = Path(tempfile.mkdtemp(prefix="cnnflow-postgres-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    bin_dir = BIN[-1]
    subprocess.run(_as_postgres([str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres"]),
                   check=True, capture_output=True)
    server = subprocess.Popen(_as_postgres([str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
                                            "-c", "listen_addresses=127.0.0.1"]),
                              stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    try:  # the server is ended however the set-up below ends (a missing driver once left it running)
        engine = sqlalchemy.create_engine(f"{url}/postgres", isolation_level="AUTOCOMMIT")
        wait_until(lambda: engine.connect().close() is None, 60, "PostgreSQL")
        with engine.connect() as connection:
            for database in ("mlflow", "optuna"):
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
        engine.dispose()
        yield url
    finally:
        kill_tree(server.pid)
        shutil.rmtree(root, ignore_errors=True)


def test_two_identical_searches_on_a_shared_postgresql_make_one_study(postgres, tmp_path):
    idx = make_idx_folder(tmp_path / "idx")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PREFECT_HOME=str(tmp_path / ".prefect"), MLFLOW_TRACKING_URI=f"{postgres}/mlflow")
    command = [sys.executable, "-m", "cnnflow.flows.cli", "search", "experiment=mnist", *tiny_overrides(idx),
               "search.trials=2", "search.pruner=none", "model.dropout_rate=choice(0.1,0.3)",
               f"search.storage={postgres}/optuna"]
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        folder.mkdir()
    started = [subprocess.Popen(command, cwd=folder, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE) for folder in folders]
    outcomes = [(p.wait(timeout=900), *p.communicate()) for p in started]

    assert sorted(rc for rc, _, _ in outcomes) == [0, 4], "\n\n".join(err[-3000:] for _, _, err in outcomes)
    refused = next(err for rc, _, err in outcomes if rc == 4)
    assert "is being searched by process" in refused and "Traceback" not in refused, refused
    [study] = optuna.get_all_study_summaries(f"{postgres}/optuna")
    trials = optuna.load_study(study_name=study.study_name, storage=f"{postgres}/optuna").trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    mlflow.set_tracking_uri(f"{postgres}/mlflow")
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`search.study` != ''")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.search != ''")
    assert sorted(c.data.tags["search_trial"] for c in children) == ["0", "1"]  # one run per trial
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 2  # no value trained twice
    tested = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="tags.evaluation_of != ''")
    assert len(tested) == 1
