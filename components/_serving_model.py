"""The `serving` model's code file (MLflow's models from code): loading the model runs it, with the
model's own copy of cnnflow's components importable."""

import mlflow

from cnnflow.components.serving import ImageClassifier

mlflow.models.set_model(ImageClassifier())
