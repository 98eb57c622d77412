import os

import pytest

from cnnflow.components import registry


def test_unknown_name_lists_the_registered_names():
    with pytest.raises(registry.UnknownComponentError) as error:
        registry.get("model", "resnet9000")
    message = str(error.value)
    assert "resnet9000" in message and "mnist_cnn" in message


def test_unknown_kind_and_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="kinds are"):
        registry.names("widget")
    with pytest.raises(registry.ComponentArgumentError, match="dropout_rate"):
        registry.build("model", {"name": "mnist_cnn", "dropout": 0.3})
    with pytest.raises(ValueError, match="'name' key"):
        registry.build("optimizer", {"learning_rate": 0.1})


def test_registering_a_different_function_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("loss", "binary_crossentropy")(lambda: None)


def test_a_new_built_in_module_is_one_file_and_one_decorator(tmp_path):
    """A copy of the package with one more file in components/models/: the registry finds and
    builds it by name, with no import list edited."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    package = Path(registry.__file__).parents[1]
    shutil.copytree(package / "components", tmp_path / "cnnflow" / "components")
    (tmp_path / "cnnflow" / "__init__.py").write_text("")
    (tmp_path / "cnnflow" / "components" / "models" / "tiny_cnn.py").write_text(
        "import keras\n\nfrom cnnflow.components.registry import register\n\n\n"
        "@register(\"model\", \"tiny_cnn\")\n"
        "def tiny_cnn(input_shape, num_classes):\n"
        "    return keras.Sequential([keras.Input(input_shape), keras.layers.Flatten(), keras.layers.Dense(num_classes)])\n")
    built = subprocess.run(
        [sys.executable, "-c", "import cnnflow.components.registry as r; "
         "print(r.__file__, r.names('model'), r.build('model', 'tiny_cnn', input_shape=(4, 4, 1), num_classes=3).count_params())"],
        env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    where, models = built.stdout.split(" ", 1)
    assert where == str(tmp_path / "cnnflow" / "components" / "registry.py")  # the copy, not the installed package
    assert "'tiny_cnn'" in models and "'mnist_cnn'" in models and models.split()[-1] == "51"  # 16*3 weights + 3 biases


def test_mnist_cnn_has_the_chapters_parameter_count():
    model = registry.build("model", "mnist_cnn", input_shape=(28, 28, 1), num_classes=10)
    assert model.count_params() == 3_274_634


@pytest.mark.parametrize("name", registry.names("model"))
def test_every_registered_model_builds_and_predicts(name):
    import numpy as np

    model = registry.build("model", name, input_shape=(32, 32, 3), num_classes=2)
    assert model(np.zeros((2, 32, 32, 3), "float32")).shape[0] == 2


def test_a_plugin_entry_point_adds_a_model(plugin_distribution):
    assert plugin_distribution in registry.names("model")
    model = registry.build("model", plugin_distribution, input_shape=(28, 28, 1), num_classes=10)
    assert model.count_params() == 4 * 9 + 4 + 4 * 10 + 10


@pytest.mark.parametrize("name", registry.names("model"))
def test_every_model_outputs_float32_under_mixed_precision(name):
    """Probabilities, logits and the loss stay float32 when the layers compute in bfloat16."""
    import keras
    import numpy as np

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = registry.build("model", name, input_shape=(32, 32, 3), num_classes=2)
        assert any(layer.compute_dtype == "bfloat16" for layer in model.layers)  # it does run mixed
        output = model(np.zeros((2, 32, 32, 3), np.float32))
        assert output.dtype == "float32", f"{name} outputs {output.dtype}"
    finally:
        keras.mixed_precision.set_global_policy("float32")
