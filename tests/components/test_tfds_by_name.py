"""Any TFDS image-classification dataset by name, on TFDS's mock data (the way TFDS tests its builders):
its shape and class names come from the dataset's features, and the sized recipe trains on it."""

from __future__ import annotations

import pytest
import tensorflow_datasets as tfds

from cnnflow.components import registry
from cnnflow.components.data import checked_partitions, make_dataset, make_split, model_input_shape, source_from
from cnnflow.components.data import tfds_source
from cnnflow.components.errors import SettingsError
from cnnflow.flows.setup.config import compose_config

SMALL = ["data.train_size=8", "data.valid_size=4", "data.batch_size=4", "data.valid_split=null"]


@pytest.fixture
def mock_tfds(monkeypatch, tmp_path):
    monkeypatch.setattr(tfds_source, "_is_prepared", lambda builder: True)  # the network is what is mocked
    with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
        yield str(tmp_path)


@pytest.mark.parametrize("name, shape, classes, extra", [
    ("emnist", (28, 28, 1), 62, []),
    ("cifar10", (32, 32, 3), 10, []),
    ("rock_paper_scissors", (300, 300, 3), 3, []),
    ("tf_flowers", (64, 48, 3), 5, ["data.options.image_size=[64,48]", "data.train_split='train[:60%]'",
                                    "data.test_split='train[60%:]'"]),  # images of several sizes; one partition
])
def test_a_tfds_dataset_by_name_trains_with_its_own_shape_and_class_names(mock_tfds, name, shape, classes, extra):
    cfg = compose_config("folder", ["data.source=tfds", f"data.name={name}", f"data.data_dir={mock_tfds}", *SMALL, *extra])
    source = source_from(cfg["data"])
    label = tfds.builder(name, data_dir=mock_tfds).info.supervised_keys[1]
    assert source.info.image_shape == shape and source.info.num_classes == classes
    assert source.info.class_names == tuple(tfds.builder(name, data_dir=mock_tfds).info.features[label].names)
    checked_partitions(cfg["data"])
    split = make_split(cfg["data"], cfg["seed"])
    images, labels = next(iter(make_dataset(cfg["data"], split, "train", cfg["seed"])))
    assert tuple(images.shape) == (4, *shape) and labels.shape == (4,)
    model = registry.build("model", cfg["model"], input_shape=model_input_shape(cfg["data"], shape), num_classes=classes)
    assert model(images).shape == (4, classes)


def test_a_dataset_of_several_sizes_asks_for_one(mock_tfds):
    cfg = compose_config("folder", ["data.source=tfds", "data.name=tf_flowers", f"data.data_dir={mock_tfds}"])
    with pytest.raises(SettingsError, match=r"TFDS 'tf_flowers' holds images of several sizes .* data.options.image_size="):
        source_from(cfg["data"])
