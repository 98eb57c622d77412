import gzip

import numpy as np
import pytest

from cnnflow.components import registry
from cnnflow.components.data import DataError, Split, examples, make_dataset, make_split, parse_split
from cnnflow.components.data import tfds_source
from cnnflow.components.data.core import split_positions
from cnnflow.components.data.idx import read_idx
from cnnflow.components.errors import TransientError
from cnnflow.flows.setup.config import compose_config
from conftest import make_idx_folder, tiny_overrides, write_idx


def data_cfg(idx_folder, *extra):
    return compose_config("mnist", tiny_overrides(idx_folder) + list(extra))["data"]


def test_idx_source_reads_the_original_format(idx_folder):
    source = registry.build("dataset", "idx", name="mnist", path=str(idx_folder))
    train = source.partition("train")
    assert train.images.shape == (240, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert source.info.image_shape == (28, 28, 1) and source.info.class_names[3] == "3"
    fashion = registry.build("dataset", "idx", name="fashion_mnist", path=str(idx_folder))
    assert fashion.info.class_names[9] == "Ankle boot"


def test_idx_errors_name_the_file_and_what_is_there(tmp_path):
    folder = make_idx_folder(tmp_path / "only_test", train=0, test=20)
    source = registry.build("dataset", "idx", name="mnist", path=str(folder))
    with pytest.raises(DataError, match=r"No train-images-idx3-ubyte\(.gz\).*t10k-images"):
        source.partition("train")
    with pytest.raises(DataError, match="needs data.path"):
        registry.build("dataset", "idx", name="mnist", path=None)
    truncated = tmp_path / "bad-images-idx3-ubyte.gz"
    with gzip.open(truncated, "wb") as handle:
        handle.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(DataError, match="truncated"):
        read_idx(truncated)
    not_idx = write_idx(tmp_path / "x.gz", np.zeros(3))
    not_idx.write_bytes(b"hello")
    with pytest.raises(DataError, match="cannot read IDX file .*x.gz: not a gzip file"):
        read_idx(not_idx)


@pytest.mark.parametrize("split, expected", [
    ("train", ("train", None, None)), ("test[:8000]", ("test", None, "8000")),
    ("test[8000:]", ("test", "8000", None)), ("train[10%:20%]", ("train", "10%", "20%")),
])
def test_split_strings(split, expected):
    name, bounds = parse_split(split)
    assert (name, bounds.start, bounds.stop) == expected


def test_split_positions_and_bad_split_strings():
    assert split_positions("test[8000:]", 10000).tolist() == list(range(8000, 10000))
    assert len(split_positions("train[:10%]", 60000)) == 6000
    with pytest.raises(DataError, match="Bad split string"):
        parse_split("train[::2]")


def test_split_is_exact_disjoint_and_stable(idx_folder):
    data = data_cfg(idx_folder)
    split = make_split(data, seed=1)
    assert split.sizes() == {"train": 200, "valid": 40, "test": 60}
    assert not set(split.indices["train"]) & set(split.indices["valid"])
    assert split.partitions == {"train": "train", "valid": "train", "test": "test"}
    import tensorflow as tf

    tf.random.set_seed(99)  # whatever ran before in the process must not change the split
    again = make_split(data, seed=1)
    for role in split.indices:
        np.testing.assert_array_equal(split.indices[role], again.indices[role])
    other_seed = make_split(data, seed=2)
    assert not np.array_equal(split.indices["valid"], other_seed.indices["valid"])


@pytest.mark.parametrize("buffer", [10000, 64])  # the recipe's (larger than the data), and a local shuffle
def test_the_mnist_recipe_carves_the_chapters_validation_images(buffer, monkeypatch, tmp_path):
    """The chapter's own split code, on TFDS's mock MNIST, picks the same validation and training
    images, in the same order, as the recipe."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds_source, "_is_prepared", lambda builder: True)  # the download is what is mocked
    with tfds.testing.mock_data(num_examples=300):
        data = compose_config("mnist", ["data.source=tfds", f"data.data_dir={tmp_path}", "data.valid_size=100",
                                        "data.train_size=200", f"data.shuffle_buffer={buffer}"])["data"]
        tf.random.set_seed(99)  # whatever ran before in the process must not change the split
        split = make_split(data, seed=1)
        mine = {role: examples(data, split, role) for role in ("valid", "train")}

        # the chapter's code from here; it takes as_dataset(...)["train"], the mock needs the split named
        mnist_bldr = tfds.builder("mnist", data_dir=str(tmp_path))
        mnist_train_orig = mnist_bldr.as_dataset(split="train", shuffle_files=False)
        mnist_train = mnist_train_orig.map(
            lambda item: (tf.cast(item["image"], tf.float32) / 255.0, tf.cast(item["label"], tf.int32)))
        tf.random.set_seed(1)
        mnist_train = mnist_train.shuffle(buffer_size=buffer, reshuffle_each_iteration=False)
        mnist_valid = mnist_train.take(100)
        mnist_train = mnist_train.skip(100)
        for role, book in (("valid", mnist_valid), ("train", mnist_train)):
            images, labels = (np.stack(column) for column in zip(*[(x.numpy(), y.numpy()) for x, y in book]))
            np.testing.assert_array_equal(mine[role].images, np.rint(images * 255).astype(np.uint8), err_msg=role)
            np.testing.assert_array_equal(mine[role].labels, labels, err_msg=role)


def test_split_from_one_partition_and_round_trip(idx_folder, tmp_path):
    data = data_cfg(idx_folder, "data.train_split='test[:40]'", "data.test_split='test[40:]'",
                    "data.train_size=30", "data.valid_size=10")
    split = make_split(data, seed=1)
    assert split.sizes() == {"train": 30, "valid": 10, "test": 20}
    assert set(split.indices["train"]) | set(split.indices["valid"]) == set(range(40))
    loaded = Split.load(split.save(tmp_path / "split.npz"))
    assert loaded.partitions == split.partitions
    np.testing.assert_array_equal(loaded.indices["test"], np.arange(40, 60))


def test_split_sizes_that_do_not_fit_are_refused(idx_folder):
    with pytest.raises(DataError, match="data.train_size=1000 but only 200"):
        make_split(data_cfg(idx_folder, "data.train_size=1000"), seed=1)
    with pytest.raises(DataError, match="leaves no training examples"):
        make_split(data_cfg(idx_folder, "data.valid_size=240"), seed=1)


def test_pipeline_scales_to_unit_range_and_batches(idx_folder):
    data = data_cfg(idx_folder, "data.batch_size=64")
    images, labels = next(iter(make_dataset(data, make_split(data, seed=1), "train", seed=1)))
    assert images.shape == (64, 28, 28, 1) and images.dtype.name == "float32"
    assert 0.0 <= float(images.numpy().min()) and float(images.numpy().max()) == pytest.approx(1.0)
    assert labels.shape == (64,)


def test_pipelines_run_without_the_autotuning_thread(idx_folder):
    # TensorFlow 2.21 often waited up to a minute for that thread when a fit dropped its iterator
    data = data_cfg(idx_folder)
    split = make_split(data, seed=1)
    for role in ("train", "valid", "test"):
        assert make_dataset(data, split, role, seed=1).options().autotune.enabled is False, role


def test_digits_source_ships_offline():
    source = registry.build("dataset", "digits")
    assert source.info.image_shape == (28, 28, 1)
    assert len(source.partition("train").labels) + len(source.partition("test").labels) == 1797


def test_tfds_source_reads_through_tfds(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds_source, "_online", lambda *a: True)  # the network is what tests may not use
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        source = registry.build("dataset", "tfds", name="mnist", data_dir=str(tmp_path))
        train = source.partition("train")
    assert train.images.shape == (30, 28, 28, 1) and source.info.num_classes == 10


def test_tfds_without_internet_says_how_to_use_local_files(monkeypatch, tmp_path):
    monkeypatch.setattr(tfds_source, "_online", lambda *a: False)
    with pytest.raises(DataError, match="needs internet.*data.source=idx data.path="):
        registry.build("dataset", "tfds", name="mnist", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="no dataset 'mnistt'"):
        registry.build("dataset", "tfds", name="mnistt", data_dir=str(tmp_path))


def test_tfds_passes_manual_dir_to_the_download(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    seen = {}

    def fake_download_and_prepare(self, download_config=None, **kwargs):
        seen["manual_dir"] = download_config.manual_dir
        raise seen["error"]

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fake_download_and_prepare)
    monkeypatch.setattr(tfds_source, "_online", lambda *a: True)  # the download path, as on a machine online
    seen["error"] = ConnectionError("no route to host")  # may pass by itself: the task retries it
    with pytest.raises(TransientError, match="could not download 'mnist', maybe for a moment.*ConnectionError"):
        registry.build("dataset", "tfds", name="mnist", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m"))
    assert str(seen["manual_dir"]) == str(tmp_path / "m")
    seen["error"] = AssertionError("checksum of train-images-idx3-ubyte.gz does not match")  # will not pass
    with pytest.raises(DataError, match="could not download or prepare 'mnist'.*checksum"):
        registry.build("dataset", "tfds", name="mnist", data_dir=str(tmp_path), manual_dir=str(tmp_path / "m2"))


def test_tfds_offline_with_a_half_filled_manual_dir_names_the_missing_files_at_once(monkeypatch, tmp_path):
    import time

    monkeypatch.setattr(tfds_source, "_online", lambda *a: False)
    manual = make_idx_folder(tmp_path / "manual", train=0, test=20)  # only the test files, as ../shared has
    data_dir = tmp_path / "tfds"
    started = time.monotonic()
    with pytest.raises(DataError) as refused:
        registry.build("dataset", "tfds", name="mnist", data_dir=str(data_dir), manual_dir=str(manual))
    assert time.monotonic() - started < 10
    message = str(refused.value)
    assert "lacks train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz" in message and "t10k" not in message
    assert "\n" not in message and "data.source=idx" in message
    assert not data_dir.exists() or not [f for f in data_dir.rglob("*") if f.is_file()]  # nothing partial


def test_two_processes_preparing_one_tfds_dataset_take_turns(tmp_path):
    import subprocess
    import sys
    import textwrap

    builder = tmp_path / "tiny_slow_builder.py"  # a real TFDS builder that needs no download
    builder.write_text(textwrap.dedent(f"""
        import time
        import numpy as np
        import tensorflow_datasets as tfds

        class TinySlow(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({{
                    "image": tfds.features.Image(shape=(4, 4, 1)), "label": tfds.features.ClassLabel(num_classes=2)}}),
                    supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {{"train": self._generate_examples(8), "test": self._generate_examples(4)}}

            def _generate_examples(self, count):
                with open({str(tmp_path / "generated.log")!r}, "a") as log:
                    log.write("x")  # one mark per partition generated
                time.sleep(2)  # long enough for the other process to arrive while this one prepares
                for i in range(count):
                    yield i, {{"image": np.full((4, 4, 1), i, np.uint8), "label": i % 2}}
        """))
    prepare = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import tiny_slow_builder
        from cnnflow.components import registry
        source = registry.build("dataset", "tfds", name="tiny_slow", data_dir={str(tmp_path / "tfds")!r},
                                manual_dir={str(tmp_path)!r})
        print(len(source.partition("train").labels))
        """)
    processes = [subprocess.Popen([sys.executable, "-c", prepare], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=180) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert [out.strip().splitlines()[-1] for out, _ in outputs] == ["8", "8"]
    assert (tmp_path / "generated.log").read_text() == "xx"  # prepared once: train and test, by one of them


def test_a_plugins_transform_with_python_control_flow_on_tensors_runs_in_the_pipeline():
    """The pipeline's own functions are traced as written (no AutoGraph: a third of a second of every
    start); a plugin's transform may still use Python `if` on a tensor, converted on its own."""
    import tensorflow as tf

    @registry.register("augment", "test_darken_bright")
    def darken_bright(level: float = 0.25):
        def apply(image, seed):
            if tf.reduce_mean(image) > level:  # a Python `if` on a tensor: needs AutoGraph
                image = image * 0.0
            return image
        return apply

    try:
        data = compose_config("quickstart", ["data.transforms.train=[{name: rescale}, {name: test_darken_bright}]"])["data"]
        images, _ = next(iter(make_dataset(data, make_split(data, seed=1), "train", seed=1)))
        means = tf.reduce_mean(images, axis=[1, 2, 3]).numpy()
        assert means.max() <= 0.25 and (means == 0).any()  # the bright ones were darkened, the others kept
    finally:
        registry._registry["augment"].pop("test_darken_bright", None)
