"""The model registry: seed_cnn exactly as the Keras original, every model's output shape, clear errors."""

from __future__ import annotations

import pytest
import torch

from visionray.models import count_parameters, create_model, list_models


def test_seed_cnn_matches_the_keras_original():
    model = create_model("seed_cnn", num_classes=10, in_channels=3, image_size=224)
    assert count_parameters(model) == 23_908_682
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.padding) for c in convs] == [(32, (3, 3), (0, 0)), (64, (3, 3), (0, 0))]
    assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 10)


@pytest.mark.parametrize("name,kwargs,channels,size", [
    ("convnet", {"depth": 2, "width": 8}, 1, 16),
    ("convnet", {"depth": 6, "width": 8}, 3, 32),
    ("seed_cnn", {}, 1, 32),
    ("resnet", {"depth": 8, "width": 8}, 3, 32),
    ("resnet", {"depth": 8, "width": 8}, 3, 96),
    ("resnet18", {}, 3, 32),
    ("resnet18", {}, 1, 96),
])
def test_output_shapes(name, kwargs, channels, size):
    model = create_model(name, 7, channels, size, **kwargs).eval()
    assert model(torch.zeros(3, channels, size, size)).shape == (3, 7)


def test_convnet_width_doubles_per_stage():
    model = create_model("convnet", 10, 3, 32, depth=3, width=8)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32]


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        create_model("vgg16", 10)
    for name in list_models():
        assert name in str(info.value)


@pytest.mark.parametrize("name,kwargs,word", [
    ("seed_cnn", {"depth": 2}, "takes no depth"),
    ("resnet", {"depth": 10}, "6n+2"),
    ("seed_cnn", {}, "image_size >= 10"),
])
def test_bad_model_arguments(name, kwargs, word):
    with pytest.raises(ValueError, match=word.replace("+", r"\+")):
        create_model(name, 10, 3, 8 if word.startswith("image_size") else 32, **kwargs)
