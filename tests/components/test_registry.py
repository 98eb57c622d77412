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
