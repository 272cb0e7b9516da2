import pytest
import torch

from gptfl_ray.models import build_model, count_parameters

# (name, input shape, expected parameter count for 10 classes)
CASES = [
    ("convnet", (1, 28, 28), 308_746),
    ("convnet", (3, 32, 32), 320_010),
    ("cnn", (1, 28, 28), 225_034),
    ("audio_cnn", (1, 40, 101), 242_250),
    ("resnet18", (3, 32, 32), 11_173_962),
    ("resnet18", (3, 224, 224), 11_181_642),
    ("resnet50", (3, 32, 32), 23_520_842),
    ("resnet50", (3, 224, 224), 23_528_522),
    ("vgg19", (3, 32, 32), 20_040_522),
    ("vgg19", (3, 224, 224), 20_040_522),
]


@pytest.mark.parametrize(("name", "shape", "params"), CASES)
def test_forward_backward_and_size(name, shape, params):
    torch.manual_seed(0)
    model = build_model(name, 10, shape)
    assert count_parameters(model) == params
    x = torch.randn(1 if shape[-1] >= 224 else 2, *shape)  # one 224×224 image: VGG19's costs ~5 s on CPU
    out = model(x)
    assert out.shape == (len(x), 10)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_unknown_model_and_too_small_input():
    with pytest.raises(ValueError, match=r"model\.name"):
        build_model("resnet9000", 10, (3, 32, 32))
    with pytest.raises(ValueError, match="at least 32"):
        build_model("vgg19", 10, (1, 28, 28))


def test_registry_builds_exactly_the_named_models():
    from gptfl_ray.models import MODELS
    from gptfl_ray.models.specs import MODEL_NAMES, WIDTH_MODELS

    assert tuple(MODELS) == MODEL_NAMES
    assert WIDTH_MODELS.issubset(MODEL_NAMES)


def test_width_changes_the_models_that_take_it():
    from gptfl_ray.models.specs import WIDTH_MODELS

    for name in WIDTH_MODELS:
        sizes = {count_parameters(build_model(name, 10, (1, 28, 28), width=w)) for w in (4, 8)}
        assert len(sizes) == 2, name


@pytest.mark.parametrize("name", ["cnn", "audio_cnn", "resnet18", "resnet50", "vgg19"])
def test_width_is_an_error_where_it_does_nothing(name, tmp_path):
    from gptfl_ray.config import ConfigError, load_config

    with pytest.raises(ValueError, match=r"^model\.width: .*fixed width"):
        build_model(name, 10, (3, 32, 32), width=8)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name: {name}, width: 8}}\n")
    with pytest.raises(ConfigError) as err:  # at config validation, before any step runs
        load_config(cfg)
    assert (
        str(err.value)
        == f"{cfg}: model.width: {name} has a fixed width (only convnet takes model.width) (got 8)"
    )
    assert load_config(cfg, ["model.width=null"]).model.name == name


def test_unknown_model_fails_config_validation(tmp_path):
    from gptfl_ray.config import ConfigError, load_config

    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {name: resnet9000}\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: model\.name: unknown model .*'resnet9000'"):
        load_config(cfg)
