"""CelebA: the native-layout folder source, augmentations, the chapter's model and a one-epoch run,
all on generated images in CelebA's exact file layout."""

import logging

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow import MlflowClient

from cnnflow.components import registry
from cnnflow.components.augment import compose
from cnnflow.components.errors import SettingsError
from cnnflow.components.data import DataError, class_counts, examples, make_dataset, make_split, model_input_shape
from cnnflow.components.data import caching
from cnnflow.components.data.core import Partition, Records
from cnnflow.components.data.pipeline import cache_needs
from cnnflow.flows.setup.config import compose_config
from cnnflow.flows.train import train_flow
from cnnflow.components.data.celeba_layout import MALE, write_celeba


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    return write_celeba(tmp_path_factory.mktemp("celeba"), train=40, valid=12, test=12)


def celeba_data(folder, *overrides):
    return compose_config("celeba", [f"data.path={folder}", "data.train_size=30", "data.valid_size=8",
                                     "data.batch_size=8", *overrides])["data"]


def source(folder, **options):
    return registry.build("dataset", "celeba_folder", name="celeb_a", path=str(folder), **options)


def test_partitions_follow_the_partition_file_and_labels_the_male_column(celeba):
    celeb = source(celeba, order="file")
    assert celeb.info.class_names == ("Female", "Male") and celeb.info.image_shape == (218, 178, 3)
    rows = [line.split() for line in (celeba / "list_attr_celeba.txt").read_text().splitlines()[2:]]
    male = {row[0]: int(row[1 + MALE] == "1") for row in rows}
    train, valid, test = (celeb.partition(name) for name in ("train", "validation", "test"))
    assert [len(p.labels) for p in (train, valid, test)] == [40, 12, 12]
    assert train.images[0].endswith("000001.jpg") and valid.images[0].endswith("000041.jpg")
    assert train.labels.tolist() == [male[f"{i:06d}.jpg"] for i in range(1, 41)]
    assert train.image(0).shape == (218, 178, 3)


def test_subsets_are_the_first_images_of_each_partition(celeba):
    data = celeba_data(celeba)
    split = make_split(data, seed=1)
    assert split.indices["train"].tolist() == list(range(30))
    assert split.indices["valid"].tolist() == list(range(8))
    assert split.sizes() == {"train": 30, "valid": 8, "test": 12}
    assert split.partitions == {"train": "train", "valid": "validation", "test": "test"}
    counts = class_counts(data, split, ("Female", "Male"))
    assert sum(counts["train"].values()) == 30 and set(counts["test"]) == {"Female", "Male"}
    full = make_split(celeba_data(celeba, "data.train_size=null", "data.valid_size=null"), seed=1)
    assert full.sizes() == {"train": 40, "valid": 12, "test": 12}


def broken_copy(celeba, tmp_path):
    import shutil

    copy = tmp_path / "celeba"
    shutil.copytree(celeba, copy)
    return copy


def test_missing_and_unreadable_images_are_named_or_skipped_and_counted(celeba, tmp_path, caplog):
    copy = broken_copy(celeba, tmp_path)
    (copy / "img_align_celeba" / "000003.jpg").unlink()
    (copy / "img_align_celeba" / "000005.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"2 unusable CelebA train images.*000003.jpg \(missing\).*000005.jpg \(not a JPEG\)"):
        source(copy).partition("train")
    with caplog.at_level(logging.WARNING):
        train = source(copy, on_bad_image="skip").partition("train")
    assert len(train.labels) == 38 and "skipped 2 unusable CelebA train images" in caplog.text
    with pytest.raises(SettingsError, match=r"data.options.on_bad_image='maybe': should be 'raise' or 'skip'"):
        compose_config("celeba", [f"data.path={copy}", "data.options.on_bad_image=maybe"])


@pytest.mark.parametrize("line, damage, message", [
    (5, lambda row: row.rsplit(" ", 1)[0], r"list_attr_celeba.txt:5: expected a file name and 40 values, got 40 fields"),
    (6, lambda row: row.replace("-1", "0", 1), r"list_attr_celeba.txt:6: attribute values must be 1 or -1"),
    (1, lambda row: "99", r"list_attr_celeba.txt:1: says 99 images but lists 64"),
])
def test_bad_attribute_rows_name_file_and_line(celeba, tmp_path, line, damage, message):
    copy = broken_copy(celeba, tmp_path)
    attributes = copy / "list_attr_celeba.txt"
    lines = attributes.read_text().splitlines()
    lines[line - 1] = damage(lines[line - 1])
    attributes.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        source(copy)


def test_bad_partition_rows_and_unknown_attributes(celeba, tmp_path):
    copy = broken_copy(celeba, tmp_path)
    (copy / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 7\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt:2: expected `<image>.jpg 0\|1\|2`"):
        source(copy)
    with pytest.raises(DataError, match="no attribute 'Beard'; the attributes are: 5_o_Clock_Shadow"):
        source(celeba, attribute="Beard")
    with pytest.raises(DataError, match="needs data.path"):
        registry.build("dataset", "celeba_folder")


AUGMENTATIONS = {
    "crop": ({"offset_height": 20, "offset_width": 0, "height": 178, "width": 178}, (178, 178, 3)),
    "random_crop": ({"height": 178, "width": 178}, (178, 178, 3)),
    "central_crop": ({"fraction": 0.5}, (110, 90, 3)),
    "resize": ({"height": 64, "width": 64}, (64, 64, 3)),
    "flip_left_right": ({}, (218, 178, 3)),
    "random_flip": ({}, (218, 178, 3)),
    "contrast": ({"factor": 2.0}, (218, 178, 3)),
    "random_contrast": ({}, (218, 178, 3)),
    "brightness": ({"delta": 0.3}, (218, 178, 3)),
    "random_brightness": ({"max_delta": 0.3}, (218, 178, 3)),
    "rescale": ({}, (218, 178, 3)),
}


def test_every_registered_augmentation_is_covered():
    assert set(registry.names("augment")) == set(AUGMENTATIONS)


@pytest.mark.parametrize("name", sorted(AUGMENTATIONS))
def test_augmentation_shape_range_and_determinism(celeba, name):
    params, shape = AUGMENTATIONS[name]
    transform = compose([{"name": name, **params}])
    image = tf.constant(source(celeba).partition("train").image(0))
    out = [transform(image, tf.constant(seed, tf.int64)).numpy() for seed in ([1, 2], [1, 2], [3, 4], [5, 6])]
    assert out[0].shape == shape
    assert out[0].min() >= 0 and out[0].max() <= (1.0 if name == "rescale" else 255)
    np.testing.assert_array_equal(out[0], out[1])  # same seed, same image
    if name.startswith("random_"):  # another seed changes it (one of three may coincide, as a flip can)
        assert any(not np.array_equal(out[0], other) for other in out[2:])


def test_train_pipeline_is_seeded_and_eval_pipeline_fixed(celeba):
    data = celeba_data(celeba)
    split = make_split(data, seed=1)
    first = [next(iter(make_dataset(data, split, "train", seed=1)))[0].numpy() for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    other = next(iter(make_dataset(data, split, "train", seed=2)))[0].numpy()
    assert not np.array_equal(first[0], other)
    images, labels = next(iter(make_dataset(data, split, "valid", seed=1)))
    assert images.shape == (8, 64, 64, 3) and 0.0 <= images.numpy().min() and images.numpy().max() <= 1.0
    assert model_input_shape(data, (218, 178, 3)) == (64, 64, 3)


# ------------------------------------------------------------------- where decoded images are kept

def _images(dataset) -> list[np.ndarray]:
    return [images.numpy() for images, _ in dataset]


def test_auto_cache_keeps_what_fits_in_memory_then_on_disk_else_decodes_every_epoch(celeba, monkeypatch, tmp_path):
    data = celeba_data(celeba, f"data.cache_dir={tmp_path}")
    needs = cache_needs(data, make_split(data, seed=1))
    assert (needs["train"].bytes_each, needs["valid"].bytes_each) == (218 * 178 * 3, 64 * 64 * 3 * 4)  # uint8, float32
    assert caching.plan(data, needs) == {"train": "memory", "valid": "memory", "test": "none"}  # a few KB
    for (memory, disk), expected in [((needs["train"].bytes, 10**9), ("memory", "disk")),  # one budget for both
                                     ((0, 10**9), ("disk", "disk")), ((0, needs["train"].bytes), ("disk", "none")),
                                     ((0, 0), ("none", "none"))]:
        monkeypatch.setattr(caching, "budgets", lambda data: (memory, disk))
        assert caching.plan(data, needs) == {"train": expected[0], "valid": expected[1], "test": "none"}
    pixels = {"train": caching.Need(60000, 784, encoded=False)}  # MNIST: in memory already
    assert caching.plan(data, pixels) == {"train": "none"}
    assert caching.plan(dict(data, cache="disk"), needs) == {"train": "disk", "valid": "disk", "test": "none"}


def test_a_disk_cache_gives_the_same_batches_and_is_published_for_later_runs(celeba, tmp_path):
    data = celeba_data(celeba, f"data.cache_dir={tmp_path}")
    split = make_split(data, seed=1)
    for role in ("train", "valid"):
        decoding = make_dataset(data, split, role, seed=1, cache="none")
        decoded = [_images(decoding) for _ in range(2)]  # two epochs: other shuffles and augmentations
        written = make_dataset(data, split, role, seed=1, cache="disk")
        for epoch in range(2):  # the first pass writes the file, the second reads it
            assert all(np.array_equal(a, b) for a, b in zip(_images(written), decoded[epoch], strict=True))
        own = sorted(tmp_path.glob(f"{role}-*.partial.*"))
        reread = make_dataset(data, split, role, seed=1, cache="disk")  # a later run: publishes and reads the shared file
        shared = sorted(f.name for f in tmp_path.glob(f"{role}-*") if ".partial." not in f.name and ".used." not in f.name)
        assert [name.split(".", 1)[1] for name in shared] == ["data-00000-of-00001", "index", "sha256"]
        assert all(np.array_equal(a, b) for a, b in zip(_images(reread), decoded[0], strict=True))
        assert sorted(tmp_path.glob(f"{role}-*.partial.*")) == own  # and writes nothing


def test_a_cache_writer_killed_mid_pass_blocks_no_rerun_and_parallel_writers_both_finish(tmp_path):
    import subprocess
    import sys
    import textwrap

    killed = textwrap.dedent(f"""
        import os, signal
        import tensorflow as tf
        from pathlib import Path
        from cnnflow.components.data import caching

        def maybe_die(i):
            if i == 3:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash half-way through the first pass
            return i
        numbers = tf.data.Dataset.range(6).map(lambda i: tf.py_function(maybe_die, [i], tf.int64))
        for _ in caching.on_disk(numbers, Path({str(tmp_path)!r}), "numbers"):
            pass
        """)
    assert subprocess.run([sys.executable, "-c", killed], capture_output=True).returncode == -9
    assert [f for f in tmp_path.iterdir() if f.name.endswith(".lockfile")]  # tf.data's lock, left behind
    numbers = tf.data.Dataset.range(6)
    first, second = (caching.on_disk(numbers, tmp_path, "numbers") for _ in range(2))
    both = [(int(a), int(b)) for a, b in tf.data.Dataset.zip(first, second)]  # two writers at once
    assert both == [(i, i) for i in range(6)]
    caching.publish_complete(tmp_path)  # as the next run to open the folder does (or this process at its exit)
    left = sorted(f.name for f in tmp_path.iterdir())
    assert "numbers.index" in left and not [name for name in left if name.endswith(".lockfile")]
    assert [int(n) for n in caching.on_disk(tf.data.Dataset.range(0), tmp_path, "numbers")] == list(range(6))


def test_streamed_records_select_like_an_array_but_keep_file_order():
    def read():
        return tf.data.Dataset.range(10).map(lambda i: tf.strings.as_string(i))

    partition = Partition(Records(read, np.arange(10)), np.arange(10) * 10, encoded="bytes")
    chosen = partition.take(np.array([7, 2, 5]))
    assert [image.numpy() for image in chosen.images.dataset()] == [b"2", b"5", b"7"]
    assert list(chosen.labels) == [20, 50, 70] and chosen.images[1] == b"5"


def test_celeba_cnn_has_the_chapters_parameter_count():
    assert registry.build("model", "celeba_cnn", input_shape=(64, 64, 3), num_classes=2).count_params() == 388_673
    with pytest.raises(ValueError, match="num_classes=10"):
        registry.build("model", "celeba_cnn", input_shape=(64, 64, 3), num_classes=10)


def _tfds_prepared_from(folder, tmp_path):
    """celeb_a prepared by TFDS's own builder from the files in `folder`, the network being the only
    thing replaced: its downloads are the local files (plus the landmark and identity lists, which
    cnnflow does not read)."""
    import zipfile

    import tensorflow_datasets as tfds

    names = sorted(path.name for path in (folder / "img_align_celeba").iterdir())
    archive = tmp_path / "img_align_celeba.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in names:
            zipped.write(folder / "img_align_celeba" / name, f"img_align_celeba/{name}")
    landmarks, identity = tmp_path / "list_landmarks_align_celeba.txt", tmp_path / "identity_CelebA.txt"
    landmarks.write_text(f"{len(names)}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x "
                         "leftmouth_y rightmouth_x rightmouth_y\n" + "".join(f"{n}{' 0' * 10}\n" for n in names))
    identity.write_text("".join(f"{n} 1\n" for n in names))
    files = {"img_align_celeba": archive, "list_eval_partition": folder / "list_eval_partition.txt",
             "list_attr_celeba": folder / "list_attr_celeba.txt", "landmarks_celeba": landmarks,
             "identity_celeba": identity}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfds.download.DownloadManager, "download", lambda self, urls: {k: str(files[k]) for k in urls})
        builder = tfds.builder("celeb_a", data_dir=str(tmp_path / "tensorflow_datasets"))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def _pixels(images) -> list[np.ndarray]:
    return [tf.io.decode_jpeg(tf.io.read_file(i) if isinstance(i, str) else i).numpy() for i in images]


def test_both_sources_take_the_chapters_celeba_subsets(tmp_path):
    """The chapter's `celeba_train.take(n)` after `as_dataset(shuffle_files=False)`, on celeb_a as
    TFDS prepares it, gives the same images in the same order as the recipe from the folder (in
    TFDS's read order) and from TFDS."""
    folder = write_celeba(tmp_path / "celeba", train=24, valid=10, test=4)
    builder = _tfds_prepared_from(folder, tmp_path)
    celeba = builder.as_dataset(shuffle_files=False)  # the chapter's code from here
    celeba_train, celeba_valid = celeba["train"].take(16), celeba["validation"].take(6)
    book = {role: [(example["image"].numpy(), int(example["attributes"]["Male"])) for example in subset]
            for role, subset in (("train", celeba_train), ("valid", celeba_valid))}

    sizes = ["data.train_size=16", "data.valid_size=6"]
    for location in ([f"data.path={folder}"], ["data.source=tfds", f"data.data_dir={tmp_path / 'tensorflow_datasets'}"]):
        data = compose_config("celeba", [*location, *sizes])["data"]
        split = make_split(data, seed=1)
        for role in ("train", "valid"):
            chosen = examples(data, split, role)
            images = [item.numpy() for item in chosen.images.dataset()] if isinstance(chosen.images, Records) \
                else chosen.images
            assert chosen.labels.tolist() == [male for _, male in book[role]], (location, role)
            for mine, theirs in zip(_pixels(images), [image for image, _ in book[role]], strict=True):
                np.testing.assert_array_equal(mine, theirs)
    in_file_order = source(folder, order="file").partition("train").images[:16]
    assert [p.rsplit("/", 1)[1] for p in in_file_order] != [p.rsplit("/", 1)[1] for p in
                                                           source(folder).partition("train").images[:16]]


def test_tfds_celeb_a_gives_encoded_images_and_the_attribute(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    from cnnflow.components.data import tfds_source

    monkeypatch.setattr(tfds_source, "_online", lambda *a: True)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        celeb = registry.build("dataset", "tfds", name="celeb_a", data_dir=str(tmp_path), attribute="Male")
        train = celeb.partition("train")
        assert isinstance(train.images, Records)  # streamed from TFDS's files when used, not held in memory
        assert train.image(0).shape == (218, 178, 3) and celeb.info.class_names == ("Female", "Male")
    assert train.encoded == "bytes" and len(train.labels) == 6 and set(train.labels) <= {0, 1}


CELEBA_FIGURES = {"learning_curves.png", "predictions.png", "confusion_matrix.png", "roc_curve.png",
                  "augmentation_examples.png", "augmentation_samples.png"}


@pytest.mark.slow
def test_one_epoch_celeba_run_records_figures_and_metrics(celeba, prefect_harness, mlflow_store):
    run_id = train_flow("celeba", [f"data.path={celeba}", "data.train_size=30", "data.valid_size=8",
                                   "data.batch_size=8", "train.epochs=1"])
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"test_accuracy", "test_loss", "test_roc_auc", "val_accuracy"} <= set(run.data.metrics)
    assert {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "figures")} == CELEBA_FIGURES
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/split_counts.json")  # pandas "split" orientation
    totals = {}
    for split, _, count in table["data"]:
        totals[split] = totals.get(split, 0) + count
    assert table["columns"] == ["split", "class", "count"] and totals == {"train": 30, "valid": 8, "test": 12}
    assert mlflow.keras.load_model(f"runs:/{run_id}/model").count_params() == 388_673
    # the served model of a one-logit face model answers P(Male) too, from JPEG files as sent
    import base64
    import io

    import pandas as pd
    from PIL import Image

    from conftest import run_test_images

    images, output = run_test_images(run_id, 2)
    jpegs = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95)
        jpegs.append(base64.b64encode(buffer.getvalue()).decode())
    answer = mlflow.pyfunc.load_model(run.data.tags["serving_uri"]).predict(pd.DataFrame({"image": jpegs}))
    assert list(answer.columns) == ["label", "probability", "p_Male", "error"]
    assert all((answer["p_Male"] >= 0.5) == (answer["label"] == "Male"))
    assert list(answer["probability"]) == pytest.approx([max(p, 1 - p) for p in answer["p_Male"]])
