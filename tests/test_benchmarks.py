"""The benchmark baselines work and compare like with like: the plain CelebA script reads the same
images and labels as cnnflow's celeba_folder source, and the settings benchmark measures a step."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from cnnflow.components.data.celeba_layout import write_celeba

from cnnflow.components import registry

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_plain_celeba_script_trains_on_the_images_and_labels_cnnflow_reads(tmp_path):
    folder = write_celeba(tmp_path / "celeba", train=64, valid=16, test=4)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from plain_celeba import first_images
    finally:
        sys.path.remove(str(BENCHMARKS))
    paths, labels = first_images(folder, "0", 48)
    ours = registry.build("dataset", "celeba_folder", name="celeb_a", path=str(folder)).partition("train")
    assert [Path(p).name for p in paths] == [Path(p).name for p in ours.images[:48]]
    assert labels == ours.labels[:48].astype(float).tolist()

    out = subprocess.run([sys.executable, str(BENCHMARKS / "plain_celeba.py"), str(folder), "--train-size", "64",
                          "--valid-size", "16", "--epochs", "2"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["epoch_seconds"]) == 2 and all(s > 0 for s in result["epoch_seconds"])
    assert len(result["epoch_cpu_seconds"]) == 2 and all(s > 0 for s in result["epoch_cpu_seconds"])
    assert result["startup_seconds"] > 0


def test_settings_benchmark_measures_a_training_step_under_a_setting():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "settings.py"), "--child", "fast_cnn", "mixed_bfloat16",
                          "--steps", "3",
                          "--min-seconds", "0.1"], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) > 0


def test_the_full_celeba_benchmark_prepares_real_tfds_files_that_the_tfds_source_streams(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from celeba_full import prepared_tfds
    finally:
        sys.path.remove(str(BENCHMARKS))
    folder = write_celeba(tmp_path / "celeba", train=24, valid=6, test=6)
    data_dir = prepared_tfds(folder, tmp_path / "tensorflow_datasets")  # TFDS's own builder, local files
    tfds_train = registry.build("dataset", "tfds", name="celeb_a", data_dir=str(data_dir), attribute="Male")
    folder_train = registry.build("dataset", "celeba_folder", path=str(folder))
    for name, size in (("train", 24), ("validation", 6), ("test", 6)):
        streamed, files = tfds_train.partition(name), folder_train.partition(name)
        assert len(streamed.labels) == size and sorted(streamed.labels) == sorted(files.labels)
    chosen = tfds_train.partition("train").take(np.array([5, 0, 17]))
    decoded = [tf.io.decode_jpeg(image).shape for image in chosen.images.dataset()]
    assert decoded == [(218, 178, 3)] * 3 and len(chosen.labels) == 3


def test_plain_mnist_script_reports_test_accuracy_in_its_test_mode(tmp_path):
    from conftest import make_idx_folder

    folder = make_idx_folder(tmp_path / "idx", train=300, test=60)
    out = subprocess.run([sys.executable, str(BENCHMARKS / "plain_mnist.py"), str(folder), "--train-size", "200",
                          "--valid-size", "100", "--epochs", "2", "--test"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["epoch_seconds"]) == 2 and len(result["epoch_cpu_seconds"]) == 2
    assert result["test_accuracy"] >= 0.9  # the generated digits are learnt in two epochs, as in cnnflow's tests


@pytest.mark.slow
def test_the_search_benchmark_runs_a_search_and_reads_its_result_back(tmp_path):
    from conftest import make_idx_folder

    folder = make_idx_folder(tmp_path / "idx", train=300, test=60)
    out = subprocess.run([sys.executable, str(BENCHMARKS / "search.py"), "--data", str(folder), "--folder",
                          str(tmp_path / "runs"), "--seeds", "0", "--samplers", "random", "--", "data.train_size=200",
                          "data.valid_size=40", "data.shuffle_each_epoch=0", "train.epochs=1", "search.epochs=2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    row = json.loads(Path(out.stdout.strip().splitlines()[-1].removeprefix("written: ")).read_text())["searches"][0]
    assert row["trials"] == 2 and row["epochs_spent"] == 2 and 0 <= row["best_val_accuracy"] <= 1
    assert "seed 0: best val" in out.stdout and "random (default pruner): median best val" in out.stdout


def test_the_position_cost_is_counted_per_epoch_even_where_an_upload_was_replaced_before_it_left():
    sys.path.insert(0, str(BENCHMARKS))
    from checkpoint_upload import position_row

    def cell(**metrics):
        return {"metrics": metrics, "precision": "float32"}

    on = cell(epoch_cpu_seconds={1: 20.0, 2: 10.0, 3: 10.0}, epoch_seconds={1: 21.0, 2: 11.0, 3: 11.0},
              positions={1: 2.0, 2: 2.0, 3: 2.0}, position_seconds={2: 0.1, 3: 0.1},
              position_write_cpu_seconds={2: 0.2, 3: 0.2}, position_upload_cpu_seconds={3: 0.3})  # epoch 2's never left
    off = cell(epoch_cpu_seconds={1: 19.0, 2: 9.5, 3: 9.5}, epoch_seconds={1: 20.0, 2: 10.0, 3: 10.0})
    row = position_row({"on": on, "off": off}, on_server_total=0.6)  # 0.1 per position on the server
    assert [e["upload_cpu"] for e in row["epochs"]] == [0.0, 0.3]
    assert [round(e["cost_percent"], 6) for e in row["epochs"]] == [5.0, 8.0]  # (0.1+0.2+0+0.2)/10, (0.1+0.2+0.3+0.2)/10
    assert row["later_epoch_cpu"] == {"on": [10.0, 10.0], "off": [9.5, 9.5]}


def test_the_folder_benchmarks_keras_side_reads_the_folder_keras_reads_and_trains_the_same_model(tmp_path):
    """benchmarks/folder.py's baseline: image_dataset_from_directory on the same class folders, the
    folder recipe's model at the shape cnnflow chose, one JSON line of epoch seconds."""
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "mine", per_class=20, formats=("png", "jpg"))
    out = subprocess.run([sys.executable, str(BENCHMARKS / "folder.py"), "--child", str(folder), "28", "28", "3", "2"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["epoch_seconds"]) == 2 and all(s > 0 for s in result["epoch_seconds"])
    assert 0 <= result["val_accuracy"] <= 1
