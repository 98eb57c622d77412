"""Fixtures: tiny generated data in the real file formats, a temporary MLflow store, one Prefect harness.

Nothing here touches the network; tests that need ../shared/data are marked `real_data` and skip
when it is absent.
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import sys
import time
import urllib.request
import textwrap
from pathlib import Path

import numpy as np
import prefect.main  # noqa: F401  (sets up Prefect logging now, bound to the session's stderr, not one test's capsys)
import pytest
from hypothesis import settings as hypothesis_settings

from cnnflow.components import registry
from reaper import kill_tree, reaped_with_us  # noqa: F401  (kill_tree: for the tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# CI decides whether a submission lands, so there the fuzzed tests draw the same examples every run
# (a regression still fails them). On a developer's machine they draw new ones each run: that is
# where new finds come from, and each is then pinned with @example.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def write_idx(path: Path, array: np.ndarray) -> Path:
    """An IDX file (unsigned bytes, gzip) exactly as MNIST ships them."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())
    return path


def digit_like_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """28x28 images whose bright bar position encodes the label: learnable in one epoch."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(len(labels), 28, 28), dtype=np.uint8)
    for image, label in zip(images, labels):
        image[2 + 2 * label : 4 + 2 * label, 4:24] = 255
    return images


def make_idx_folder(folder: Path, train: int = 240, test: int = 60, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        if not count:
            continue
        labels = np.arange(count) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", digit_like_images(labels, seed + count))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


FORMATS = ("png", "jpg", "bmp", "gif", "webp", "tiff")


def make_image_folder(folder: Path, classes=("cat", "dog", "bird"), per_class: int = 12, gray: bool = False,
                      sizes=((28, 28),), formats=FORMATS, seed: int = 0) -> Path:
    """Class subfolders of images whose bright bar's position is the class (learnable), in turn in
    each of `formats` and `sizes`: the layout users' own folders have."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            height, width = sizes[i % len(sizes)]
            pixels = rng.integers(0, 40, size=(height, width), dtype=np.uint8)
            row = (2 + 4 * label) * height // 28
            pixels[row : row + max(2, height // 14), width // 7 : 6 * width // 7] = 255
            image = Image.fromarray(pixels if gray else np.dstack([pixels, pixels // 2, 255 - pixels]))
            image.save(folder / name / f"{name}{i:03d}.{formats[i % len(formats)]}")
    return folder


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    return make_idx_folder(tmp_path / "idx")


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store; the working directory (outputs/, mlruns/) is the test's own."""
    monkeypatch.chdir(tmp_path)
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)  # flows set it process-wide; a stale one from another test must not stay
    # nor the experiment an earlier test set active (mlflow.set_experiment): its id is another store's
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)  # which mlflow.set_experiment also sets
    return uri


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # 30 s is not always enough on a busy 2-core machine
        yield


def finished_checkpoint(run_id: str, folder: Path) -> dict:
    """A finished run's newest epoch checkpoint, as `cnnflow continue` finds it: its local copy is
    gone when the artifact store is a folder here that holds it (flows/tracking/checkpoints.py,
    tidy_finished), so it is fetched from there."""
    import logging

    from cnnflow.flows.tracking.checkpoints import newest_checkpoint

    checkpoint, skipped = newest_checkpoint(run_id, folder, logging.getLogger("test"))
    assert checkpoint, skipped
    return checkpoint


def tiny_overrides(idx: Path, epochs: int = 1, model: str = "fast_cnn") -> list[str]:
    """The MNIST recipe shrunk to seconds: a few hundred generated images, one epoch, and the fast
    recipe's model (dropout and batch norm; its checkpoints 1.2 MB where mnist_cnn's are 39 MB)
    unless a test is about the chapter's model."""
    return [f"data.path={idx}", "data.source=idx", "data.train_size=200", "data.valid_size=40",
            "data.shuffle_buffer=100", f"train.epochs={epochs}", f"model={model}"]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present at {SHARED_DATA}")
    return SHARED_DATA


PLUGIN = textwrap.dedent('''
    import keras
    from cnnflow.components.registry import register

    @register("model", "tiny_plugin_cnn")
    def tiny_plugin_cnn(input_shape, num_classes, dropout_rate=0.0):
        return keras.Sequential([
            keras.Input(shape=tuple(input_shape)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(num_classes, activation="softmax"),
        ])
''')


@pytest.fixture
def plugin_distribution(tmp_path, monkeypatch):
    """An installed third-party distribution, as pip would leave it: a module plus dist-info with an entry point."""
    (tmp_path / "cnnflow_tiny_plugin.py").write_text(PLUGIN)
    dist_info = tmp_path / "cnnflow_tiny_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cnnflow-tiny-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[cnnflow.components]\ntiny = cnnflow_tiny_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "tiny_plugin_cnn"
    sys.modules.pop("cnnflow_tiny_plugin", None)
    registry._registry["model"].pop("tiny_plugin_cnn", None)
    registry._loaded_entry_points.discard("tiny=cnnflow_tiny_plugin")


# ------------------------------------------------------------------------ a real Prefect server

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def start_server(command: list[str], health: str, env: dict, log: Path) -> subprocess.Popen:
    """A server process in a session of its own (so `kill_tree` ends all it started, and it ends with
    this process however that ends), once its health URL answers."""
    process = reaped_with_us(subprocess.Popen(command, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                                              start_new_session=True))
    wait_until(lambda: urllib.request.urlopen(health, timeout=2).status == 200, 120, " ".join(command[:4]))
    return process


def start_worker(pool: str, name: str, root: Path, env: dict, **popen) -> subprocess.Popen:
    """`prefect worker start` for one flow run at a time, in folder `root/name` (its log `root/name.log`),
    in a session of its own, ending with this process as a server does."""
    (root / name).mkdir(exist_ok=True)
    return reaped_with_us(subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name, "--limit", "1"],
        cwd=root / name, env=env, stdout=open(root / f"{name}.log", "a"), stderr=subprocess.STDOUT,
        start_new_session=True, **popen))


def worker_training(run, workers: dict) -> str:
    """The name of the worker (of `workers`: name -> its process) whose flow-run process trains `run`,
    read from the run's lease ("host pid started token")."""
    import psutil

    trainer = int(run.data.params["lease.1"].split()[1])
    return next(name for name, process in workers.items()
                if trainer in [child.pid for child in psutil.Process(process.pid).children(recursive=True)])


@pytest.fixture
def prefect_server(tmp_path):
    """`prefect server start` on a free loopback port, with its own database."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_API_URL=url)  # where the UI in a browser finds the API (default: port 4200)
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: urllib.request.urlopen(f"{url}/health", timeout=2).status == 200, 90, "the Prefect server")
    yield url, env
    server.terminate()
    server.wait(timeout=30)


def deployment(url: str, name: str):
    """The deployment `flow/name` on the Prefect server at `url`, or None."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def png_base64(image: np.ndarray) -> str:
    """An image as a PNG file, base64-encoded: what a client sends to the served model."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image.squeeze()).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def run_test_images(run_id: str, count: int) -> tuple[list[np.ndarray], Path]:
    """The first `count` test images of a run (raw pixels), and the run's output folder."""
    from cnnflow.components.data import Split, examples
    from cnnflow.flows.tracking import store

    cfg, output = store.run_settings(run_id)
    test = examples(cfg["data"], Split.load(output / "split.npz"), "test")
    return [test.image(i) for i in range(count)], output
