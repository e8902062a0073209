"""One model registry, timm-style: ``@register_model`` and ``create_model(name, ...)``.

Every builder takes ``num_classes``, ``in_channels`` and ``image_size`` plus its own keyword
arguments; ``check_model_args`` validates those keywords without building anything, so a spec
with a bad model argument fails at validation time.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_COMMON = ("num_classes", "in_channels", "image_size")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    assert fn.__name__ not in _REGISTRY, f"model {fn.__name__} registered twice"
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _builder(name: str) -> Callable[..., nn.Module]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}") from None


def model_args(name: str) -> list[str]:
    """The keyword arguments a model accepts besides the common three."""
    return [p for p in inspect.signature(_builder(name)).parameters if p not in _COMMON]


def check_model_args(name: str, kwargs: dict[str, Any]) -> None:
    allowed = model_args(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no {', '.join(unknown)}; it accepts: {', '.join(allowed) or 'no extra arguments'}"
        )


def create_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, **kwargs: Any) -> nn.Module:
    check_model_args(name, kwargs)
    return _builder(name)(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- seed_cnn


@register_model
def seed_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """The seed model, the Keras CNN VisionRay started from, layer for layer: Conv2D(32, 3x3, relu, valid) -> MaxPool(2) ->
    Conv2D(64, 3x3, relu, valid) -> MaxPool(2) -> Flatten -> Dense(128, relu) -> Dense(classes).
    At 224x224x3 and 10 classes it has 23,908,682 parameters, as Keras reports."""
    side = ((image_size - 2) // 2 - 2) // 2
    if side < 1:
        raise ValueError(f"seed_cnn needs image_size >= 10, got {image_size}")
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * side * side, 128), nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


# --------------------------------------------------------------------------- plain CNN


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


@register_model
def convnet(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
    depth: int = 4, width: int = 32, dropout: float = 0.2, hidden: int = 128,
) -> nn.Module:
    """``depth`` conv-BN-ReLU blocks; channels start at ``width`` and double each time the map is
    halved by max-pooling (after every block while the map is at least 4 px, channels capped at 16x
    width), then global average pooling, dropout and a dense head."""
    layers: list[nn.Module] = []
    cin, cout, side = in_channels, width, image_size
    for _ in range(depth):
        layers.append(_conv_bn(cin, cout))
        cin = cout
        if side >= 4:
            layers.append(nn.MaxPool2d(2))
            side //= 2
            cout = min(cout * 2, width * 16)
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes),
    )


# --------------------------------------------------------------------------- residual nets


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


@register_model
def resnet(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
    depth: int = 20, width: int = 16, dropout: float = 0.0,
) -> nn.Module:
    """CIFAR-style ResNet (He et al. 2016, section 4.2): ``depth`` = 6n+2 layers in three stages of
    n basic blocks with ``width``, 2x and 4x channels. Inputs up to 64 px get the small-image stem
    (one 3x3 conv); larger inputs get the ImageNet stem (7x7 stride 2 and max-pooling)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    if image_size <= 64:
        stem = _conv_bn(in_channels, width)
    else:
        stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
        )
    blocks: list[nn.Module] = []
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for i in range(n):
            blocks.append(BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
            cin = cout
    return nn.Sequential(
        stem, *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes)
    )


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    if image_size <= 64:  # small-image stem: keep the resolution for 32x32 inputs
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


@register_model
def resnet18(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's ResNet-18 (randomly initialised: nothing is downloaded)."""
    return _torchvision_resnet("resnet18", num_classes, in_channels, image_size)


@register_model
def resnet34(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's ResNet-34 (randomly initialised)."""
    return _torchvision_resnet("resnet34", num_classes, in_channels, image_size)


@register_model
def resnet50(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's ResNet-50 (randomly initialised)."""
    return _torchvision_resnet("resnet50", num_classes, in_channels, image_size)


# --------------------------------------------------------------------------- fast CIFAR net


def _airbench_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 conv, no bias; its first ``cin`` filters start as the identity (dirac), as in airbench94."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(cin, cout)])
    return conv


def _airbench_norm(c: int) -> nn.BatchNorm2d:
    """airbench94's BatchNorm: scales fixed at 1 (only the biases learn), running statistics with
    momentum 0.4 (its 0.6 in the other convention), eps 1e-12."""
    norm = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class _ConvGroup(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            _airbench_conv(cin, cout), nn.MaxPool2d(2), _airbench_norm(cout), nn.GELU(),
            _airbench_conv(cout, cout), _airbench_norm(cout), nn.GELU(),
        )


class AirbenchNet(nn.Module):
    """The purpose-built CIFAR-10 net of the speed record (Keller Jordan's airbench94): a frozen 2x2
    patch-whitening convolution initialised from the training data, three conv groups of
    ``width``, 4x and 4x channels (dirac-initialised convs, BatchNorm with fixed scales),
    max-pooling and a scaled linear head. ``whiten_bias_epochs``: the whitening bias trains for that
    many epochs only (``param_epochs`` tells the optimiser)."""

    def __init__(self, num_classes: int, in_channels: int, width: int, whiten_bias_epochs: float | None = None):
        super().__init__()
        self.whiten_bias_epochs = whiten_bias_epochs
        self.whiten = nn.Conv2d(in_channels, 2 * in_channels * 4, 2, bias=True)
        self.body = nn.Sequential(
            nn.GELU(), _ConvGroup(self.whiten.out_channels, width), _ConvGroup(width, 4 * width),
            _ConvGroup(4 * width, 4 * width), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(4 * width, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.whiten(x))) / 9.0

    def param_epochs(self) -> dict[int, float]:
        """id(parameter) -> epochs it trains for, for parameters that stop early."""
        return {} if self.whiten_bias_epochs is None else {id(self.whiten.bias): self.whiten_bias_epochs}

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters to the eigenvectors of the 2x2 patch covariance of ``images``
        (scaled by 1/sqrt(eigenvalue)), both signs, and freeze them."""
        c = images.shape[1]
        # (N, C, H-1, W-1, 2, 2) -> one row per patch, ordered (channel, row, column) like conv weights
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov)
        filters = (eigvec.T / torch.sqrt(eigval + eps)[:, None]).reshape(-1, c, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        self.whiten.bias.zero_()
        self.whiten.weight.requires_grad_(False)


@register_model
def airbench(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 64,
             whiten_bias_epochs: float | None = None) -> nn.Module:
    """airbench94's net for 32x32 inputs; ``data.pipeline: batched`` feeds it fastest. Its whitening
    layer is initialised from the first 5,000 training images when training starts; its bias
    trains for ``whiten_bias_epochs`` (airbench94: 3), by default throughout."""
    return AirbenchNet(num_classes, in_channels, width, whiten_bias_epochs)


# --------------------------------------------------------------------------- test-time augmentation

TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}  # mode -> forward passes per image
TTA_MODES = tuple(TTA_VIEWS)


def tta_logits(model: nn.Module, x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """float logits of ``model`` on the batch ``x`` (N, C, H, W), averaged over test-time views.
    ``flip``: the image and its mirror. ``flip_translate`` (airbench94's level 2): half the image
    and its mirror, a quarter each the same pair shifted one pixel up-left and down-right
    (reflect padding). Training's evaluation, ``visionray evaluate`` and serving all call this."""
    if mode not in TTA_MODES:
        raise ValueError(f"tta {mode!r}: allowed {', '.join(TTA_MODES)}")
    if mode == "none":
        return model(x).float()

    def mirrored(v: torch.Tensor) -> torch.Tensor:
        return (model(v).float() + model(v.flip(-1)).float()) / 2

    if mode == "flip":
        return mirrored(x)
    h, w = x.shape[-2:]
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    return 0.5 * mirrored(x) + 0.25 * (mirrored(padded[..., :h, :w]) + mirrored(padded[..., 2:, 2:]))
