"""The folder source (components/data/folder.py) on generated folders in each layout users have."""

from __future__ import annotations

import logging
import re
import shutil

import numpy as np
import pytest

from cnnflow.components.data import folder as folder_source
from cnnflow.components.data.core import DataError
from cnnflow.components.errors import SettingsError
from conftest import make_image_folder


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _pixels(source, partition: str) -> list[np.ndarray]:
    chosen = source.partition(partition)
    return [chosen.image(i) for i in range(len(chosen.labels))]


def test_class_folders_of_mixed_formats_and_sizes_give_three_partitions_of_one_shape(tmp_path, caplog):
    root = make_image_folder(tmp_path / "pets", sizes=((28, 28), (56, 42), (28, 28)))
    (root / "cat" / ".DS_Store").write_bytes(b"\0")
    (root / "dog" / "notes.txt").write_text("taken in May")
    (root / "dog" / "cut.jpg").write_bytes((root / "dog" / "dog001.jpg").read_bytes()[:200])  # a cut-off JPEG
    (root / "README").write_text("my pets")
    with caplog.at_level(logging.WARNING):
        source = folder_source.folder(path=str(root))
    assert source.info.class_names == ("bird", "cat", "dog") and source.info.image_shape == (28, 28, 3)
    assert "skipped 1 unusable images" in caplog.text and "dog/cut.jpg (damaged" in caplog.text
    note = source.info.note
    counts = re.search(r"36 images \(train (\d+), valid (\d+) carved from train, test (\d+) carved from train\)", note)
    assert counts and sum(map(int, counts.groups())) == 36 and int(counts[1]) >= 28
    assert "resized to 28x28 (the most common size, 28x28: 24 of 36)" in note
    assert "passed over: 1 file outside the class folders, 1 hidden file or folder, 1 other file (.txt)" in note
    for partition in ("train", "valid", "test"):
        labels = source.partition(partition).labels
        assert sorted(set(labels)) == [0, 1, 2]  # every class in every partition
        assert all(image.shape == (28, 28, 3) and image.dtype == np.uint8 for image in _pixels(source, partition))
    tiff = [i for i, path in enumerate(source.partition("train").images) if path.endswith(".png") and "converted" in path]
    assert tiff, "TIFF files are converted for tf.data"


def test_a_gray_folder_gives_one_channel_unless_three_are_asked(tmp_path):
    root = make_image_folder(tmp_path / "gray", gray=True, formats=("png", "jpg", "bmp", "tiff"))
    assert folder_source.folder(path=str(root)).info.image_shape == (28, 28, 1)
    colour = folder_source.folder(path=str(root), channels=3, image_size=[16, 20])
    assert colour.info.image_shape == (16, 20, 3)
    assert all(image.shape == (16, 20, 3) for image in _pixels(colour, "test"))
    gif = make_image_folder(tmp_path / "gif", gray=True, formats=("gif", "webp"))  # tf.data reads them as colour
    assert all(image.shape == (28, 28, 1) for image in _pixels(folder_source.folder(path=str(gif)), "train"))


def test_split_folders_are_used_as_given_and_a_missing_one_is_carved(tmp_path):
    root = tmp_path / "split"
    make_image_folder(root / "train", per_class=10)
    make_image_folder(root / "val", per_class=2, seed=1)
    source = folder_source.folder(path=str(root))
    sizes = [len(source.partition(p).labels) for p in ("train", "valid", "test")]
    assert sizes[1] == 6 and sizes[0] + sizes[2] == 30 and sizes[2] >= 3  # one test image of each class at least
    assert all("/val/" in path for path in source.partition("valid").images)
    carved = set(source.partition("test").images)
    make_image_folder(root / "train", per_class=20, seed=2)  # more images of the same classes, new names ...
    grown = folder_source.folder(path=str(root))
    assert carved <= set(grown.partition("test").images) | set(grown.partition("train").images)
    kept = [p for p in source.partition("train").images if p in set(grown.partition("test").images)]
    assert kept == []  # ... and no file that trained moved to test


def test_a_csv_of_paths_and_labels(tmp_path):
    root = make_image_folder(tmp_path / "flat", per_class=6)
    rows = ["path,label"] + [f"{path.relative_to(root)},{'odd' if int(path.stem[-3:]) % 2 else 'even'}"
                             for path in sorted(root.rglob("*.*"))]
    (root / "labels.csv").write_text("\n".join(rows) + "\nnotes.txt,even\n")
    source = folder_source.folder(path=str(root), labels="labels.csv")
    assert source.info.class_names == ("even", "odd")
    assert sum(len(source.partition(p).labels) for p in ("train", "valid", "test")) == 18
    (root / "bad.csv").write_text("cat/cat000.png,even,holdout\n")
    with pytest.raises(DataError, match=r"bad.csv:1: split 'holdout' is not one of train, valid"):
        folder_source.folder(path=str(root), labels="bad.csv")


@pytest.mark.parametrize("make, message", [
    (lambda root: root.mkdir(), r"holds no images \(BMP, GIF, JPEG, PNG, TIFF, WebP\) in class subfolders"),
    (lambda root: make_image_folder(root, classes=("cat",)), r"has one class \(cat\): a classifier needs"),
    (lambda root: make_image_folder(root, per_class=2), r"class 'bird' has 2 training image\(s\) .* at least 3 per class"),
])
def test_a_folder_that_cannot_train_says_why_in_one_line(tmp_path, make, message):
    make(tmp_path / "mine")
    with pytest.raises(DataError, match=message):
        folder_source.folder(path=str(tmp_path / "mine"))


def test_unusable_images_stop_the_run_when_asked_and_a_wrong_size_is_a_setting(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    (root / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"1 unusable images in .*cat/empty.png \(not an image Pillow reads\).*on_bad_image=skip"):
        folder_source.folder(path=str(root), on_bad_image="raise")
    with pytest.raises(SettingsError, match=r"image_size=\[28\]: give \[height, width\]"):
        folder_source.folder(path=str(root), image_size=[28])


def test_each_image_is_checked_once(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "pets")
    folder_source.folder(path=str(root))
    checked = []
    monkeypatch.setattr(folder_source, "_check", lambda path: checked.append(path) or folder_source.Scanned(28, 28))
    folder_source.folder(path=str(root))
    assert checked == []
    shutil.copy(root / "cat" / "cat000.png", root / "cat" / "new.png")
    folder_source.folder(path=str(root))
    assert [path.name for path in checked] == ["new.png"]


def test_the_recipes_options_reach_the_source(tmp_path):
    from cnnflow.components.data import source_from
    from cnnflow.flows.setup.config import compose_config

    root = make_image_folder(tmp_path / "pets")
    cfg = compose_config("folder", [f"data.path={root}", "data.options.image_size=[16,20]", "data.options.channels=1"])
    assert source_from(cfg["data"]).info.image_shape == (16, 20, 1)
