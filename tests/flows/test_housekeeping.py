"""Disk you can see and bound: a finished run keeps what `continue` needs and nothing twice; `cnnflow
cache list | verify | prune | clear` and the data.cache_max_gb cap; what runs trained on compared
(`cnnflow data diff`, the retrain sequence's growth check)."""

import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import mlflow
from mlflow import MlflowClient

from cnnflow.components.data import caching, make_dataset, make_split
from cnnflow.flows.cli import main
from cnnflow.flows.setup.config import compose_config
from cnnflow.flows.train import continue_flow, train_flow
from conftest import make_idx_folder, tiny_overrides


def test_a_finished_run_keeps_its_newest_epoch_checkpoint_once_and_no_positions(prefect_harness, mlflow_store,
                                                                                 tmp_path):
    idx = make_idx_folder(tmp_path / "idx")
    # a position every 0.006 s: several inside each epoch, in the folder and in the artifact store
    run_id = train_flow("mnist", tiny_overrides(idx, epochs=2) + ["train.checkpoint_minutes=0.0001", "plots=none"])
    client = MlflowClient()
    folder = Path(client.get_run(run_id).data.tags["output_dir"])
    assert [m.step for m in client.get_metric_history(run_id, "position_upload_seconds")]  # positions were taken
    slots = sorted(entry.path for entry in client.list_artifacts(run_id, "checkpoints"))
    assert slots == ["checkpoints/slot-0"]  # epoch 2's; the positions' slots and epoch 1's are gone
    left = sorted(file.name for file in folder.iterdir())
    assert not [name for name in left if name.startswith("checkpoint-") or name == "untrained.keras"], left
    assert "model.keras" in left and "split.npz" in left  # the run's own files stay
    assert continue_flow(run_id, 1) == run_id  # from the artifact store's copy
    assert max(m.step for m in client.get_metric_history(run_id, "val_accuracy")) == 3
    assert sorted(entry.path for entry in client.list_artifacts(run_id, "checkpoints")) == ["checkpoints/slot-1"]


def test_checkpoint_copies_of_finished_runs_are_pruned_and_an_unfinished_runs_stay(prefect_harness, mlflow_store,
                                                                                     tmp_path, capsys):
    import logging

    from cnnflow.flows.tracking import checkpoints

    idx = make_idx_folder(tmp_path / "idx")
    run_id = train_flow("mnist", tiny_overrides(idx) + ["plots=none"])
    folder = Path(MlflowClient().get_run(run_id).data.tags["output_dir"])
    assert not list(folder.glob("checkpoint-*"))  # a local store holds it: no copy
    checkpoints.newest_checkpoint(run_id, folder, logging.getLogger())  # fetched, as continue does on another machine
    copy = sum(file.stat().st_size for file in folder.glob("checkpoint-*"))
    unfinished = folder.parent / mlflow.start_run(experiment_id=MlflowClient().get_run(run_id).info.experiment_id).info.run_id
    mlflow.end_run("KILLED")  # a stopped training: its checkpoints are what resumes it
    unfinished.mkdir()
    (unfinished / "checkpoint-epoch0001.keras").write_bytes(b"x" * 1000)
    outputs = ["--dir", str(tmp_path / "caches"), "--outputs", str(folder.parent.parent)]
    assert main(["cache", "list", *outputs]) == 0
    listed = capsys.readouterr().out
    assert f"checkpoint copy  {caching.readable_size(copy)}" in listed and f"run {unfinished.name} (run KILLED)" in listed
    assert main(["cache", "prune", "--max-size", "0", *outputs]) == 0
    said = capsys.readouterr().out
    assert said.startswith("removed 0 data caches and 1 checkpoint copies") and "(run KILLED)" in said
    assert not list(folder.glob("checkpoint-*")) and (unfinished / "checkpoint-epoch0001.keras").exists()
    assert (folder / "model.keras").exists() and (folder / "split.npz").exists()  # the run's own files stay
    assert continue_flow(run_id, 1) == run_id  # from the store again


def _caches(tmp_path, sizes: list[int], *extra, folder: Path | None = None) -> tuple[Path, list[Path]]:
    """Disk caches of validation subsets of the given sizes, oldest first (a minute apart)."""
    idx = make_idx_folder(tmp_path / "idx")
    folder = folder or tmp_path / "caches"
    made = []
    for age, size in enumerate(sizes):
        data = compose_config("mnist", tiny_overrides(idx) + [f"data.valid_size={size}", f"data.cache_dir={folder}",
                                                              *extra])["data"]
        before = {e.final for e in caching.entries(folder)}
        for _ in make_dataset(data, make_split(data, seed=1), "valid", seed=1, cache="disk"):
            pass
        [final] = [e.final for e in caching.entries(folder) if e.final not in before]
        for mark in folder.glob(f"*.used.*.{os.getpid()}"):  # as if the run that made it had ended
            mark.unlink()
        os.utime(f"{final}.index", (time.time() - 600 + 60 * age,) * 2)
        made.append(final)
    return folder, made


def test_prune_removes_the_least_recently_used_first_and_never_one_in_use(tmp_path, capsys):
    folder, (oldest, middle, newest) = _caches(tmp_path, [10, 20, 30])
    in_use = Path(f"{oldest}.used.{socket.gethostname()}.{os.getpid()}")  # this live process reads the oldest
    in_use.touch()
    room = sum(e.bytes for e in caching.entries(folder) if e.final != middle)  # for two of the three
    nothing = ["--outputs", str(tmp_path / "none")]
    assert main(["cache", "prune", "--dir", str(folder), "--max-size", str(room), *nothing]) == 0
    assert "removed 1 data caches and 0 checkpoint copies" in capsys.readouterr().out
    assert [e.final for e in caching.entries(folder)] == [oldest, newest]  # the least recently used not in use went
    assert main(["cache", "list", "--dir", str(folder), "--outputs", str(tmp_path / "none")]) == 0
    listed = capsys.readouterr().out
    assert f"{oldest.name} (in use)" in listed and newest.name in listed and "total:" in listed
    in_use.unlink()
    assert main(["cache", "prune", "--dir", str(folder), "--older-than", "0.0065", *nothing]) == 0  # 9.4 minutes: the oldest is 10
    assert [e.final for e in caching.entries(folder)] == [newest]
    assert main(["cache", "clear", "--dir", str(folder), *nothing]) == 0
    assert caching.entries(folder) == [] and (folder / "CACHEDIR.TAG").exists()


def test_verify_sets_damaged_caches_aside_and_bad_arguments_are_one_line(tmp_path, capsys):
    folder, (first, second) = _caches(tmp_path, [10, 20])
    data_file = next(Path(folder).glob(f"{second.name}.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:-8])
    assert main(["cache", "verify", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{second.name}: " in out and "1 of 2 data caches" in out and "1 set aside" in out
    assert [e.final for e in caching.entries(folder)] == [first]
    assert main(["cache", "prune", "--dir", str(folder), "--max-size", "3Q", "--outputs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "cnnflow: error: --max-size 3Q: give a size like 500M, 20G or 1.5GB"
    assert main(["cache", "prune", "--dir", str(folder)]) == 2
    assert "needs --older-than DAYS, --max-size SIZE" in capsys.readouterr().err


def test_the_cache_cap_evicts_the_least_recently_used_when_a_new_cache_is_published(tmp_path):
    folder, made = _caches(tmp_path, [30, 20])
    cap_gb = sum(e.bytes for e in caching.entries(folder)) / 2**30  # room for what is there, not one more
    idx = make_idx_folder(tmp_path / "more")
    data = compose_config("mnist", tiny_overrides(idx) + ["data.valid_size=10", f"data.cache_dir={folder}",
                                                          f"data.cache_max_gb={cap_gb}"])["data"]
    split = make_split(data, seed=1)
    for _ in range(2):  # this run writes it; the next run to open the folder publishes it, within the cap
        for _ in make_dataset(data, split, "valid", seed=1, cache="disk"):
            pass
    kept = [e.final for e in caching.entries(folder)]
    assert len(kept) == 2 and made[1] in kept and made[0] not in kept  # the oldest made room for the new one
    assert sum(e.bytes for e in caching.entries(folder)) <= cap_gb * 2**30


@pytest.mark.parametrize("text, expected", [("500M", 500 * 2**20), ("1.5GB", int(1.5 * 2**30)), ("20GiB", 20 * 2**30),
                                            ("1000", 1000)])
def test_sizes_read_as_people_write_them(text, expected):
    from cnnflow.flows.housekeeping import size_bytes

    assert size_bytes(text) == expected


def test_retraining_on_a_growing_subset_is_checked_and_data_diff_says_what_changed(prefect_harness, mlflow_store,
                                                                                    tmp_path, capsys, caplog):
    from conftest import digit_like_images, write_idx

    from cnnflow.flows.retrain import retrain_flow

    idx = make_idx_folder(tmp_path / "idx")
    overrides = [f"data.path={idx}", "data.source=idx", "data.valid_size=40", "data.shuffle_buffer=100",
                 "train.epochs=1", "retrain.sizes=[60,120]", "plots=none"]
    first, second = retrain_flow("mnist", overrides), retrain_flow("mnist", overrides)
    tags = MlflowClient().get_run(second).data.tags
    assert tags["retrain_contains_previous"] == "True" and tags["retrain_added"] == "60"
    assert tags["retrain_previous_run"] == first
    assert main(["data", "diff", first[:8], second[:8]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["train", "60", "120", "60", "0", "0", "60"]
    assert table[2].split() == ["valid", "40", "40", "0", "0", "0", "40"]
    assert table[-1].startswith("test split: the same")

    labels = np.arange(240) % 10  # one training image of the second run changed in place, one pixel
    images = digit_like_images(labels, 240)
    from cnnflow.components.data import Split

    changed_at = int(Split.load(Path(tags["output_dir"]) / "split.npz").indices["train"][0])
    images[changed_at, 0, 0] ^= 1
    write_idx(idx / "train-images-idx3-ubyte.gz", images)
    from cnnflow.components.data import core

    core._cached_source.cache_clear()  # as a new process reads the files
    third = retrain_flow("mnist", overrides)  # the last size again: the same examples, one of them changed
    assert MlflowClient().get_run(third).data.tags["retrain_contains_previous"] == "False"
    assert "1 changed since" in caplog.text and f"cnnflow data diff {second[:8]} {third[:8]}" in caplog.text
    assert main(["data", "diff", second, third]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["train", "120", "120", "0", "0", "1", "119"]
    assert main(["data", "diff", second, "nope"]) == 4
    assert "no run 'nope'" in capsys.readouterr().err
