"""A folder of one's own images end to end: `experiment=folder` trains on it, and its class names reach
the split line, the run, `predict` and the served model, which take images of any size as training did."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from PIL import Image

from cnnflow.flows.inference import predict_flow
from cnnflow.flows.train import train_flow
from conftest import make_image_folder, png_base64

CLASSES = ("circle", "square", "star")


def test_a_folder_trains_and_its_class_names_reach_predictions_and_serving(prefect_harness, mlflow_store, tmp_path,
                                                                           monkeypatch, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "mine", classes=CLASSES, per_class=30, sizes=((32, 32), (48, 40), (32, 32)))
    with caplog.at_level("INFO"):
        run_id = train_flow("folder", [f"data.path={root}", "train.epochs=2", "data.batch_size=16", "plots=none"])
    assert "split: train" in caplog.text and "circle" in caplog.text.split("split: train")[1].splitlines()[0]
    run = MlflowClient().get_run(run_id)
    with open(MlflowClient().download_artifacts(run_id, "features.json")) as recorded:
        features = json.load(recorded)
    assert features["class_names"] == list(CLASSES) and features["image_shape"] == [32, 32, 3] and features["any_size"]
    assert run.data.params["model.head"] == "global_average"

    big = np.asarray(Image.open(next((root / "star").glob("*.png"))).convert("RGB").resize((64, 80)))
    Image.fromarray(big).save(tmp_path / "big star.png")
    Image.fromarray(big[..., 0]).save(tmp_path / "gray star.jpg")
    rows = predict_flow(run_id, [str(tmp_path / "big star.png"), str(tmp_path / "gray star.jpg")])
    assert all(row["label"] in CLASSES and "error" not in row for row in rows)

    serving = mlflow.pyfunc.load_model(run.data.tags["serving_uri"])
    answer = serving.predict(pd.DataFrame({"image": [png_base64(big), png_base64(big[..., 0])]}))
    assert set(answer["label"]) <= set(CLASSES) and answer["error"].isna().all()
    assert answer["label"][0] == rows[0]["label"]  # the same file, fitted the same way by both
