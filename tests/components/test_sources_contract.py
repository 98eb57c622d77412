"""Every registered data source, built from every recipe that README shows with it, through
`compose_config` as a user's command does (TFDS on its mock data, the way TFDS tests its builders):
the options a recipe carries for another source never break the chosen one."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from cnnflow.components import registry
from cnnflow.components.data import checked_partitions, make_dataset, make_split, tfds_source
from cnnflow.components.errors import DataError
from cnnflow.flows.setup.config import choices, compose_config
from cnnflow.components.data.celeba_layout import write_celeba
from conftest import make_idx_folder, make_image_folder

SMALL = ["data.train_size=8", "data.valid_size=4", "data.batch_size=4", "data.shuffle_buffer=0"]


def _sources(experiment: str) -> list[str]:
    """The sources the guide shows for a recipe: its own, plus TFDS for every recipe of a TFDS dataset."""
    own = compose_config(experiment)["data"]["source"]
    return sorted({own} | ({"tfds"} if own not in ("digits", "folder") else set()))


CASES = [(experiment, source) for experiment in choices("experiment") for source in _sources(experiment)]


def test_every_registered_source_is_covered():
    assert {source for _, source in CASES} == set(registry.names("dataset"))


@pytest.fixture
def tfds_mock(monkeypatch, tmp_path):
    monkeypatch.setattr(tfds_source, "_is_prepared", lambda builder: True)  # the network is what is mocked
    with tfds.testing.mock_data(num_examples=24):
        yield str(tmp_path / "tensorflow_datasets")


def _location(source: str, tmp_path, tfds_dir: str) -> list[str]:
    if source == "idx":
        return [f"data.path={make_idx_folder(tmp_path / 'idx')}"]
    if source == "celeba_folder":
        return [f"data.path={write_celeba(tmp_path / 'celeba', train=16, valid=8, test=8)}"]
    if source == "folder":
        return [f"data.path={make_image_folder(tmp_path / 'mine', per_class=20)}"]
    if source == "tfds":
        return [f"data.data_dir={tfds_dir}"]
    return []


@pytest.mark.parametrize("experiment, source", CASES, ids=[f"{e}-{s}" for e, s in CASES])
def test_a_recipe_builds_its_source_splits_and_first_batch(experiment, source, tmp_path, tfds_mock):
    cfg = compose_config(experiment, [f"data.source={source}", *_location(source, tmp_path, tfds_mock), *SMALL])
    partitions = checked_partitions(cfg["data"])
    assert partitions and all(len(p.labels) for p in partitions.values())
    split = make_split(cfg["data"], cfg["seed"])
    assert split.sizes()["train"] == 8 and split.sizes()["valid"] == 4
    images, labels = next(iter(make_dataset(cfg["data"], split, "train", cfg["seed"])))
    assert images.shape[0] == 4 and images.dtype == "float32" and labels.shape == (4,)


def test_the_celeba_recipe_through_tfds_reaches_the_download_without_internet(monkeypatch, tmp_path):
    monkeypatch.setattr(tfds_source, "_online", lambda *args: False)
    cfg = compose_config("celeba", ["data.source=tfds", f"data.data_dir={tmp_path}"])
    with pytest.raises(DataError, match="TFDS needs internet to download 'celeb_a'") as refused:
        checked_partitions(cfg["data"])
    # the hint names the source that reads CelebA's own files, not MNIST's
    assert "data.source=celeba_folder data.path=" in str(refused.value) and "ubyte" not in str(refused.value)


def test_the_celeba_recipe_trains_end_to_end_on_tfds_mock_data(prefect_harness, mlflow_store, tfds_mock, recwarn):
    from mlflow import MlflowClient

    from cnnflow.flows.train import train_flow

    run_id = train_flow("celeba", ["data.source=tfds", f"data.data_dir={tfds_mock}", *SMALL, "train.epochs=1",
                                   "plots=none"])
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["split.train_size"] == "8"
    assert "test_roc_auc" in run.data.metrics
    # TFDS's records, filtered to the split, state their size: Keras warned this after each evaluation
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]
