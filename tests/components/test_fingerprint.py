"""What a split holds, named by its bytes (components/data/fingerprint.py), and the disk caches named by
it: equal for the same bytes anywhere, different for one changed pixel, label or order; caches that
cannot go stale and are checked when opened."""

import logging
import shutil

import numpy as np
import pytest

from cnnflow.components.data import caching, fingerprint_of, fingerprinted, make_dataset, make_split
from cnnflow.components.data.celeba_layout import write_celeba
from cnnflow.components.data.core import Partition, Records
from cnnflow.components.data.fingerprint import of_partition
from cnnflow.flows.setup.config import compose_config
from conftest import make_idx_folder, tiny_overrides, write_idx


def data_cfg(folder, *extra):
    return compose_config("mnist", tiny_overrides(folder) + list(extra))["data"]


def fingerprints(folder, *extra) -> dict[str, str]:
    data = data_cfg(folder, *extra)
    return fingerprinted(data, make_split(data, seed=1)).fingerprints


def test_the_same_bytes_in_two_folders_give_the_same_fingerprints(tmp_path):
    first = make_idx_folder(tmp_path / "a")
    second = shutil.copytree(first, tmp_path / "elsewhere" / "b")
    assert fingerprints(first) == fingerprints(second)
    assert len(set(fingerprints(first).values())) == 3  # train, valid, test hold different examples
    assert all(len(value) == 64 for value in fingerprints(first).values())  # a full SHA-256


@pytest.mark.parametrize("change", ["pixel", "label"])
def test_one_changed_pixel_or_label_gives_another_fingerprint(tmp_path, change):
    from conftest import digit_like_images

    original = make_idx_folder(tmp_path / "a")
    changed = shutil.copytree(original, tmp_path / "b")
    labels = np.arange(240) % 10
    images = digit_like_images(labels, 240)
    data = data_cfg(original)
    first_train = int(make_split(data, seed=1).indices["train"][0])
    if change == "pixel":
        images[first_train, 0, 0] ^= 1
    else:
        labels[first_train] = (labels[first_train] + 1) % 10
    write_idx(changed / "train-images-idx3-ubyte.gz", images)
    write_idx(changed / "train-labels-idx1-ubyte.gz", labels)
    before, after = fingerprints(original), fingerprints(changed)
    assert before["train"] != after["train"]
    assert before["valid"] == after["valid"] and before["test"] == after["test"]  # only what changed


def test_the_order_of_examples_is_part_of_the_fingerprint():
    images = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2, 1)
    labels = np.array([0, 1, 0, 1])
    forward = of_partition(Partition(images, labels))
    backward = of_partition(Partition(images[::-1], labels[::-1]))
    assert forward.digest != backward.digest
    assert sorted(map(bytes, forward.examples)) == sorted(map(bytes, backward.examples))  # the same examples


def test_encoded_images_are_named_by_their_bytes_in_files_or_in_records(tmp_path):
    import tensorflow as tf

    folder = write_celeba(tmp_path / "celeba", train=6, valid=2, test=2)
    files = sorted(str(path) for path in (folder / "img_align_celeba").glob("*.jpg"))[:6]
    labels = np.array([0, 1, 1, 0, 1, 0])
    in_files = of_partition(Partition(np.array(files), labels, encoded="path"))
    contents = [open(file, "rb").read() for file in files]
    in_memory = of_partition(Partition(np.array(contents, dtype=object), labels, encoded="bytes"))
    streamed = of_partition(Partition(Records(lambda: tf.data.Dataset.from_tensor_slices(contents), np.arange(6)),
                                      labels, encoded="bytes"))
    assert in_files.digest == in_memory.digest == streamed.digest


def test_an_overwritten_file_makes_a_new_cache_and_the_run_reads_the_new_images(tmp_path):
    folder = make_idx_folder(tmp_path / "data", seed=0)
    cache = tmp_path / "cache"
    data = data_cfg(folder, f"data.cache_dir={cache}")
    split = make_split(data, seed=1)
    first = _batches(make_dataset(data, split, "valid", seed=1, cache="disk"))
    make_idx_folder(folder, seed=7)  # other images, the same file names, the folder's time unchanged or not
    _forget_sources()
    second = _batches(make_dataset(data, split, "valid", seed=1, cache="disk"))
    decoded = _batches(make_dataset(data, split, "valid", seed=1, cache="none"))
    assert not np.array_equal(first, second) and np.array_equal(second, decoded)
    assert len(caching.entries(cache)) == 2  # (listing publishes what this process wrote)


@pytest.mark.parametrize("damage", ["cut short", "garbled", "checksums lost"])
def test_a_damaged_cache_is_set_aside_and_rebuilt_with_one_warning(tmp_path, caplog, damage):
    folder = make_idx_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    data = data_cfg(folder, f"data.cache_dir={cache}")
    split = make_split(data, seed=1)
    expected = _batches(make_dataset(data, split, "valid", seed=1, cache="disk"))
    caching.publish_complete(cache)  # as the next run to open the folder does (or this process at its exit)
    [written] = _published(cache, "valid-*.data-*")
    if damage == "cut short":
        written.write_bytes(written.read_bytes()[:-100])
    elif damage == "garbled":
        contents = bytearray(written.read_bytes())
        contents[len(contents) // 2] ^= 0xFF
        written.write_bytes(bytes(contents))
    else:
        _published(cache, "valid-*.sha256")[0].unlink()
    with caplog.at_level(logging.WARNING, logger=caching.__name__):
        reread = _batches(make_dataset(data, split, "valid", seed=1, cache="disk"))
    assert np.array_equal(reread, expected)
    [warning] = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert "is damaged" in warning and "set aside" in warning
    assert len(list((cache / "damaged").iterdir())) >= 2  # kept for a look
    caching.publish_complete(cache)
    assert caching.damaged(cache / written.name.split(".")[0]) is None  # the rebuilt one holds


def test_the_cache_folder_is_tagged_for_backup_tools(tmp_path):
    folder = make_idx_folder(tmp_path / "data")
    data = data_cfg(folder, f"data.cache_dir={tmp_path / 'cache'}")
    _batches(make_dataset(data, make_split(data, seed=1), "valid", seed=1, cache="disk"))
    assert (tmp_path / "cache" / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")


def test_fingerprints_are_computed_once_per_process_for_the_same_examples(tmp_path, monkeypatch):
    from cnnflow.components.data import fingerprint

    folder = make_idx_folder(tmp_path / "data")
    data = data_cfg(folder)
    split = make_split(data, seed=1)
    calls = []
    real = fingerprint.of_partition
    monkeypatch.setattr(fingerprint, "of_partition", lambda partition: calls.append(1) or real(partition))
    assert fingerprint_of(data, split, "train") == fingerprint_of(data, split, "train")
    assert len(calls) == 1


def _published(cache, pattern: str) -> list:
    """The shared cache files (not a writer's own copy, kept until its process ends)."""
    return [file for file in cache.glob(pattern) if ".partial." not in file.name]


def _batches(dataset) -> np.ndarray:
    return np.concatenate([images.numpy() for images, _ in dataset])


def _forget_sources():
    """A new process: sources and partitions read anew (a test's files changed in place)."""
    from cnnflow.components.data import core

    core._cached_source.cache_clear()
    core._cached_partition.cache_clear()
