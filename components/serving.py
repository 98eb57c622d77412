"""The `serving` model each training run logs beside its Keras `model`: an MLflow pyfunc that MLflow
serves over REST (`mlflow models serve -m models:/NAME@champion`).

It takes a DataFrame with a column `image` of base64-encoded image files (PNG, JPEG), checks and
preprocesses them as the run's evaluation images were (its `data.transforms.eval`), and returns per
image `label`, `probability` (and `p_<class 1>` for a one-logit model) and `error`. Images are
untrusted: a row that is not base64, not an image, too big or of the wrong size gets its `error` and
no label, and the other rows are answered.

The model carries the code it runs (this package's components, as `code/cnnflow/components`) and
requirements pinned to what it was trained with, so it serves where cnnflow is not installed.
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from cnnflow.components import outputs
from cnnflow.components.errors import DataError
from cnnflow.components.images import preprocessed, read_image

MAX_IMAGE_BYTES = 20_000_000  # per request image, before decoding: no image this model takes is near it


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.settings = json.loads(Path(context.artifacts["settings"]).read_text())
        self.model = keras.models.load_model(context.artifacts["keras_model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        settings = self.settings
        images, answered, rows = [], [], []
        for number, text in enumerate(model_input["image"]):
            try:
                images.append(read_image(_decoded(text, number), tuple(settings["image_shape"]), f"image {number}",
                                         settings.get("any_size", False)))
                answered.append(number)
                rows.append(None)
            except DataError as error:
                rows.append({"error": str(error)})
        if images:
            # the model called on each chunk (not Keras' predict, which builds a tf.data pipeline per request)
            logits = [self.model(preprocessed(images[start:start + 256], settings["eval_transforms"]), training=False)
                      for start in range(0, len(images), 256)]
            probabilities = outputs.probabilities(np.concatenate(logits), settings["from_logits"])
            for number, row in zip(answered, outputs.labelled(probabilities, settings["class_names"])):
                rows[number] = {**row, "error": None}
        columns = ["label", "probability", *([f"p_{settings['class_names'][1]}"] if settings["one_logit"] else []),
                   "error"]
        frame = pd.DataFrame([{column: (row or {}).get(column) for column in columns} for row in rows], columns=columns)
        return frame.astype(object).where(frame.notna(), None)  # JSON null where a row has no value, not NaN


def _decoded(text: Any, number: int) -> bytes:
    if not isinstance(text, str) or len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise DataError(f"image {number}: give a base64-encoded image file of at most {MAX_IMAGE_BYTES:,} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"image {number}: not valid base64") from None


def log_serving_model(model_file: str, features: dict[str, Any], data: dict[str, Any], loss: dict[str, Any],
                      example: np.ndarray, requirements: list[str]):
    """Logs the pyfunc `serving` of the active run; `example` (one raw test image) becomes its input example."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema
    from PIL import Image

    one_logit = len(features["class_names"]) == 2 and outputs.is_one_logit(loss)
    settings = {"image_shape": features["image_shape"], "class_names": features["class_names"],
                "eval_transforms": data["transforms"]["eval"], "from_logits": bool(loss.get("from_logits")),
                "one_logit": one_logit, "any_size": features.get("any_size", False)}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "settings.json").write_text(json.dumps(settings))
        code = _code_bundle(folder / "cnnflow")
        png = folder / "example.png"
        Image.fromarray(example.squeeze()).save(png)
        example_frame = pd.DataFrame({"image": [base64.b64encode(png.read_bytes()).decode()]})
        answer = [ColSpec("string", "label"), ColSpec("double", "probability")]
        answer += [ColSpec("double", f"p_{features['class_names'][1]}")] if one_logit else []
        signature = ModelSignature(inputs=Schema([ColSpec("string", "image")]),
                                   outputs=Schema([*answer, ColSpec("string", "error", required=False)]))
        return mlflow.pyfunc.log_model(
            name="serving", python_model=str(Path(__file__).with_name("_serving_model.py")), code_paths=[str(code)],
            signature=signature,
            artifacts={"keras_model": model_file, "settings": str(folder / "settings.json")},
            pip_requirements=requirements, input_example=example_frame)


def _code_bundle(target: Path) -> Path:
    """The modules of this package that serving imports, laid out as `cnnflow/components` for import:
    not the teaching code, the data generators or the training's callbacks, which a served model
    never runs. Found by following the imports from _serving_model.py, so the bundle cannot miss one."""
    package = Path(__file__).parent
    for path in _imported_modules(package / "_serving_model.py", package):
        (target / "components" / path.relative_to(package)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / "components" / path.relative_to(package))
    return target


def _imported_modules(start: Path, package: Path) -> set[Path]:
    """`start` and every module of `package` it imports, directly or through others (imports inside
    functions included), with the __init__.py of each package on the way."""
    import ast

    found, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in found:
            continue
        found.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                dotted = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                dotted = [alias.name for alias in node.names]
            else:
                continue
            for name in dotted:
                if not name.startswith("cnnflow.components"):
                    continue
                parts = name.split(".")[2:]
                for depth in range(len(parts) + 1):  # each package on the way, then the module
                    stem = package.joinpath(*parts[:depth])
                    todo += [p for p in (stem / "__init__.py", stem.with_suffix(".py")) if p.is_file()]
    return found
