import types

import pytest
from omegaconf import OmegaConf

from cnnflow.components import registry
from cnnflow.components.augment import compose
from cnnflow.components.data import model_input_shape
from cnnflow.components.errors import SettingsError
from cnnflow.flows.setup.config import choices, compose_config, to_yaml
from cnnflow.flows.setup import settings
from cnnflow.flows.setup.settings import flatten


# the chapter's counts (README) and the fast recipe's width-24 model (benchmarks/README)
# (the folder recipe's fast_cnn sized to 28x28 gray images: three blocks and a global-average head)
PARAMETERS = {"mnist_cnn": 3_274_634, "celeba_cnn": 388_673, "fast_cnn": 99_778, "folder": 53_698}


@pytest.mark.parametrize("experiment", choices("experiment"))
def test_every_experiment_composes_and_its_components_instantiate(experiment):
    cfg = compose_config(experiment)
    assert cfg["experiment"] == experiment
    registry.get("dataset", cfg["data"]["source"])
    image_shape, classes = ((218, 178, 3), 2) if cfg["data"]["source"] == "celeba_folder" else ((28, 28, 1), 10)
    model = registry.build("model", cfg["model"], input_shape=model_input_shape(cfg["data"], image_shape),
                           num_classes=classes)
    assert model.count_params() == PARAMETERS.get(experiment, PARAMETERS[cfg["model"]["name"]])
    registry.build("loss", cfg["loss"])
    registry.build("optimizer", cfg["optimizer"])
    for spec in cfg["train"]["callbacks"].values():
        registry.build("callback", spec)
    for spec in cfg["plots"].values():
        registry.get("plot", spec["name"])
    for spec in cfg["plots"].get("augmentation_examples", {}).get("columns", {}).values():
        compose(spec)
    for role in ("train", "eval"):
        compose(cfg["data"]["transforms"][role])
    assert to_yaml(cfg) == OmegaConf.to_yaml(OmegaConf.create(cfg))  # config.yaml as Hydra users know it


@pytest.mark.parametrize("group", ["data", "model", "loss", "optimizer", "plots"])
def test_every_group_choice_composes(group):
    for choice in choices(group):
        assert compose_config("quickstart", [f"{group}={choice}"])[group] or (group, choice) == ("plots", "none")


def test_plots_none_draws_no_figure_and_a_group_given_a_value_is_refused():
    assert compose_config("quickstart", ["plots=none"])["plots"] == {}
    for value in ("{}", "[1,2]", "0"):  # `plots={}` was merged into the figures and left them all on
        with pytest.raises(SettingsError, match=r"plots is a config group; choose one of binary, classification, none"):
            compose_config("quickstart", [f"plots={value}"])


def test_the_mnist_experiment_is_the_chapters_recipe():
    cfg = compose_config("mnist")
    data = cfg["data"]
    assert (data["source"], data["name"], data["train_size"], data["valid_size"]) == ("tfds", "mnist", 50000, 10000)
    assert (data["shuffle_buffer"], data["shuffle_each_epoch"], data["batch_size"]) == (10000, 0, 64)
    assert cfg["model"] == {"name": "mnist_cnn", "dropout_rate": 0.5}
    assert cfg["optimizer"]["name"] == "adam" and cfg["optimizer"]["learning_rate"] == 0.001
    assert cfg["loss"] == {"name": "sparse_categorical_crossentropy", "from_logits": False}
    assert cfg["train"]["epochs"] == 20
    assert compose_config("fashion_mnist")["data"]["name"] == "fashion_mnist"


def test_overrides_apply():
    cfg = compose_config("mnist", ["train.epochs=2", "data.batch_size=128", "seed=7"])
    assert (cfg["train"]["epochs"], cfg["data"]["batch_size"], cfg["seed"]) == (2, 128, 7)


@pytest.mark.parametrize("overrides, expected", [
    (["data=nope"], "choices for data: celeba, digits"),
    (["train.epochz=3"], "train.epochz"),
    (["seed"], "seed"),
    (["data.train_split=test[:10]"], "quote it: \"data.train_split='test[:10]'\""),
    (["runtime.precision=half"], "runtime.precision='half': should be 'auto', 'float32', 'mixed_bfloat16' or 'mixed_float16'"),
    (["runtime.intra_op_threads=-2"], "runtime.intra_op_threads=-2: should be greater than or equal to 0"),
    (["runtime.jit_compile=maybe"], "runtime.jit_compile='maybe': should be a valid boolean"),
])
def test_bad_settings_name_the_value_and_the_choices(overrides, expected):
    with pytest.raises(SettingsError, match=expected.replace("[", r"\[")):
        compose_config("quickstart", overrides)
    with pytest.raises(SettingsError, match="celeba, fashion_mnist, fashion_mnist_fast, folder, mnist, mnist_fast, mnist_small, quickstart"):
        compose_config("nope")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1, 2], "e": {}}


def test_a_learning_rate_schedule_gets_the_length_of_the_training():
    from cnnflow.components.data import steps_per_epoch
    from cnnflow.flows.train import _optimizer

    cfg = compose_config("fashion_mnist_fast")
    fifty_thousand = types.SimpleNamespace(indices={"train": range(50000)})  # a split's training positions
    schedule = _optimizer(cfg, steps_per_epoch(cfg["data"], fifty_thousand))._learning_rate
    assert schedule.decay_steps == 5 * 391  # 5 epochs of ceil(50000 / 128) batches
    assert float(schedule(0)) == pytest.approx(0.004) and float(schedule(5 * 391)) == pytest.approx(0.0)
    assert compose_config("mnist_fast")["data"]["name"] == "mnist"


@pytest.mark.parametrize("steps, momentum", [(1000, 0.99), (391, 0.9767), (19, 0.6158)])
def test_batch_norm_statistics_are_paced_by_the_steps_of_an_epoch(steps, momentum):
    """Long epochs keep Keras' 0.99; shorter ones weigh their first half at most 1% (issue 39: with
    0.99, 2,400 images of 19 steps an epoch evaluated at chance)."""
    from cnnflow.flows.train import _compiled_model

    cfg = compose_config("fashion_mnist_fast")
    model = _compiled_model(cfg, {"input_shape": [28, 28, 1], "num_classes": 10}, steps)
    norms = [layer for layer in model.layers if layer.__class__.__name__ == "BatchNormalization"]
    assert [layer.momentum for layer in norms] == pytest.approx([momentum] * 3, abs=1e-4)


def test_the_run_forms_fields_are_overrides_before_the_list_checked_by_the_one_schema():
    from cnnflow.flows.setup.config import fields_of, with_fields

    overrides = with_fields(["seed=3"], epochs=2, data_path="/data/it's, [odd] name", train_size="full", batch_size=None)
    assert overrides == ["train.epochs=2", "data.path='/data/it\\'s, [odd] name'", "data.train_size=full", "seed=3"]
    cfg = compose_config("mnist_small", overrides)
    assert (cfg["train"]["epochs"], cfg["data"]["path"], cfg["data"]["train_size"], cfg["seed"]) == \
        (2, "/data/it's, [odd] name", "full", 3)
    assert cfg["data"]["batch_size"] == compose_config("mnist_small")["data"]["batch_size"]  # empty: the recipe's
    with pytest.raises(SettingsError, match=r"train.epochs=0: should be greater than or equal to 1"):
        compose_config("mnist_small", with_fields([], epochs=0))
    # what `cnnflow serve` puts in the form's fields comes back as the same settings
    served = ["data.source=idx", "data.path=/data/mnist", "data.train_size=200", "optimizer.learning_rate=0.01"]
    fields, rest = fields_of(served)
    assert fields == {"data_source": "idx", "data_path": "/data/mnist", "train_size": 200}
    assert rest == ["optimizer.learning_rate=0.01"]
    assert compose_config("mnist", with_fields(rest, **fields)) == {**compose_config("mnist", served),
                                                                     "overrides": with_fields(rest, **fields)}


def test_the_flows_parameters_describe_themselves_for_the_prefect_form():
    from prefect.utilities.callables import parameter_schema

    from cnnflow.flows.inference import evaluate_flow, predict_flow
    from cnnflow.flows.retrain import retrain_flow
    from cnnflow.flows.train import continue_flow, train_flow

    train = parameter_schema(train_flow.fn).model_dump()["properties"]
    assert train["experiment"]["enum"] == choices("experiment")
    assert {"full"} <= {kind.get("const") for kind in train["train_size"]["anyOf"]}
    for step in (train_flow, retrain_flow, continue_flow, evaluate_flow, predict_flow):
        properties = parameter_schema(step.fn).model_dump()["properties"]
        undescribed = [name for name, field in properties.items() if not field.get("description")]
        assert not undescribed, f"{step.name}: {undescribed}"


def test_defaults_live_in_conf_alone_not_in_the_schema():
    """The schema types and bounds every setting; its value comes from conf/ only, so the two can
    never disagree (train.max_loss_factor was 1000 in conf/ and None in the schema). Without a
    default a key left out of conf/ fails as `missing setting`, which the test above would show."""
    def defaulted(model, prefix=""):
        for name, field in model.model_fields.items():
            if not field.is_required():
                yield f"{prefix}{name} = {field.default!r}"
            section = settings._section(field.annotation)
            if section:
                yield from defaulted(section, f"{prefix}{name}.")

    optional_sections = {"search = None"}  # only `cnnflow search` composes search=NAME
    assert set(defaulted(settings.Settings)) == optional_sections


@pytest.mark.parametrize("choice", choices("search"))
def test_every_search_choice_composes_with_every_key(choice):
    cfg = compose_config("fashion_mnist_fast", [f"search={choice}"])
    assert set(cfg["search"]) == set(settings.Search.model_fields)
