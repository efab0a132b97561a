"""Model zoo: the classic tutorial MLP, a small CNN and ResNet-18, built from config and shape;
`rebuild` makes the saved network (normalization in front) from its spec.

Each model is a function `(shape, num_classes, cfg: ModelConfig) -> nn.Module` taking raw-scale
standardized pixels (N, C, H, W) float32 and returning logits (N, num_classes); `choices.MODELS`
names them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from pipeline import choices
from pipeline.config import ModelConfig


def build_model(cfg: ModelConfig, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The network `cfg.name` (see `choices.MODELS`) for images of `shape` (C, H, W)."""
    return choices.load(choices.MODELS, cfg.name)(shape, num_classes, cfg)


def mlp(shape, num_classes: int, cfg: ModelConfig) -> nn.Module:
    """input -> `hidden` -> classes, as in the well-known PyTorch MNIST tutorial."""
    c, h, w = shape
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(c * h * w, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, num_classes),
    )


def small_cnn(shape, num_classes: int, cfg: ModelConfig) -> nn.Module:
    """Three conv blocks (BN + ReLU, the second pooled) and a linear head; `hidden`/4 base
    width."""
    c, dropout = shape[0], cfg.dropout
    width = max(8, cfg.hidden // 4)

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(c, width),
        *block(width, 2 * width),
        nn.MaxPool2d(2),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, num_classes),
    )


def lenet(shape, num_classes: int, cfg: ModelConfig) -> nn.Module:
    """LeNet-5's layout (LeCun et al. 1998) with today's parts: two 5x5 conv blocks of 16 and 32
    channels (ReLU, 2x2 max-pool; no batch norm, which cost half the CPU time here for no
    accuracy on MNIST), then `hidden` units. The first conv pads by 2,
    as LeNet-5 saw MNIST padded to 32x32; the second pads only on small inputs (under 20 px,
    e.g. 8x8 digits), which would not fit otherwise. About 1.7 M multiply-adds per 28x28 image,
    a seventeenth of `cnn`'s, so MNIST trains in about a minute on two CPU cores
    (BENCHMARKS.md)."""
    c, h, w = shape

    def block(cin: int, cout: int, pad: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2)]

    features = nn.Sequential(*block(c, 16, 2), *block(16, 32, 0 if min(h, w) >= 20 else 2))
    with torch.no_grad():  # the flattened size for this input shape
        flat = features(torch.zeros(1, c, h, w)).numel()
    return nn.Sequential(
        *features,
        nn.Flatten(),
        nn.Linear(flat, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, num_classes),
    )


def resnet18(shape, num_classes: int, cfg: ModelConfig) -> nn.Module:
    """torchvision's ResNet-18, randomly initialized (nothing downloaded).

    Small images (<= 64 px, e.g. CIFAR's 32x32) get the usual CIFAR stem: a 3x3 stride-1 first
    convolution and no max-pool, so the 4x4 feature map is not shrunk to 1x1 before layer4.
    """
    from torchvision.models import resnet18 as tv_resnet18

    c, h, w = shape
    dropout = cfg.dropout  # `hidden` does not apply: ResNet-18's widths are fixed
    net = tv_resnet18(weights=None, num_classes=num_classes)
    if max(h, w) <= 64:
        net.conv1 = nn.Conv2d(c, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif c != 3:
        net.conv1 = nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False)
    if dropout:
        net.fc = nn.Sequential(nn.Dropout(dropout), net.fc)
    return net


class Normalize(nn.Module):
    """Raw pixel values in, standardized values out, so the saved model takes raw images."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


CHECK_OUT_ITS_DATA = "check out its data version first (`pipeline lineage`)"


def built_for_other(whose: str, mismatch: str, fix: str = CHECK_OUT_ITS_DATA) -> LookupError:
    """The one refusal of a model (`whose`: "the teacher", "image-classifier v3") that takes
    other inputs or classes than data/ holds (`mismatch`: `ModelSpec.mismatch`), with `fix`."""
    return LookupError(
        f"{whose} was built for other inputs or classes than data/ holds ({mismatch}); {fix}"
    )


@dataclass(frozen=True)
class ModelSpec:
    """Everything but the weights: what `rebuild` needs, and what a caller of the model must
    know (input shape, class names). Saved beside the weights as a plain dict."""

    model: dict  # the ModelConfig it was built from
    shape: tuple[int, int, int]  # C x H x W of one input image
    classes: tuple[str, ...]
    mean: float  # pixel normalization of the training split, built into the network
    std: float
    contract: dict | None = None  # the input contract (data/contract.py); None: saved before it
    # Layers whose width differs from what `model` builds (structured pruning): module name in
    # the rebuilt network -> [in, out] channels or features ([n, n] for a norm). None: as built.
    layers: dict | None = None
    # "group": every batch norm replaced by a group norm (DP-SGD needs per-sample gradients,
    # which batch norm mixes across the batch); None: as built.
    norm: str | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        return cls(
            dict(raw["model"]),
            tuple(raw["shape"]),
            tuple(raw["classes"]),
            float(raw["mean"]),
            float(raw["std"]),
            raw.get("contract"),
            raw.get("layers"),
            raw.get("norm"),
        )

    def mismatch(self, data) -> str:
        """How this model's inputs and classes differ from `data`'s (a Dataset: `classes`,
        `shape`); '' when they match."""

        def classes(names: list[str]) -> str:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            return f"{len(names)} classes [{shown}]"

        def shape(dims) -> str:
            return "x".join(str(d) for d in dims)

        parts = []
        if list(self.classes) != list(data.classes):
            parts.append(f"model: {classes(list(self.classes))}, data: {classes(data.classes)}")
        if list(self.shape) != list(data.shape):
            parts.append(f"model input {shape(self.shape)}, data {shape(data.shape)}")
        return "; ".join(parts)

    def require_fits(self, data, whose: str, fix: str = CHECK_OUT_ITS_DATA) -> None:
        """LookupError (`built_for_other`) unless this model takes `data`'s inputs and classes."""
        mismatch = self.mismatch(data)
        if mismatch:
            raise built_for_other(whose, mismatch, fix)

    def input_contract(self):
        """How inputs become this model's pixels (data.contract.InputContract); a model saved
        before contracts gets the behaviour it had then."""
        from pipeline.data.contract import InputContract

        if self.contract is None:
            return InputContract.legacy_for(self.shape, self.classes)
        return InputContract.from_dict(self.contract)

    def to_dict(self) -> dict:
        """Plain lists, strings and numbers: loads with `weights_only=True`."""
        raw = asdict(self)
        return {**raw, "shape": list(self.shape), "classes": list(self.classes)}


def rebuild(spec: ModelSpec) -> nn.Module:
    """The network described by `spec` (pruned layers at their recorded widths, group norms
    where `spec.norm` says so), with freshly initialized weights."""
    net = build_model(ModelConfig(**spec.model), spec.shape, len(spec.classes))
    model = nn.Sequential(Normalize(spec.mean, spec.std), net)
    if spec.norm == "group":
        group_norms(model)
    for name, (cin, cout) in (spec.layers or {}).items():
        model.set_submodule(name, _resized(model.get_submodule(name), cin, cout))
    return model


def group_norms(model: nn.Module) -> bool:
    """Replace every batch norm of `model` in place by a group norm of gcd(32, channels) groups,
    Opacus's rule (`ModuleValidator.fix`, after Wu and He 2018). True when one was replaced."""
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    for name, m in found:
        model.set_submodule(
            name, nn.GroupNorm(math.gcd(32, m.num_features), m.num_features, affine=m.affine)
        )
    return bool(found)


RESIZABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm)


def layer_widths(model: nn.Module) -> dict[str, list[int]]:
    """Every resizable layer's [in, out] width, by module name (the `layers` of a spec)."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            widths[name] = [module.in_channels, module.out_channels]
        elif isinstance(module, nn.Linear):
            widths[name] = [module.in_features, module.out_features]
        elif isinstance(module, nn.BatchNorm2d):
            widths[name] = [module.num_features] * 2
        elif isinstance(module, nn.GroupNorm):
            widths[name] = [module.num_channels] * 2
    return widths


def changed_widths(spec: ModelSpec, model: nn.Module) -> dict[str, list[int]]:
    """The layers of `model` whose width differs from the network `spec.model` builds."""
    built = layer_widths(rebuild(replace(spec, layers=None)))
    return {name: w for name, w in layer_widths(model).items() if built.get(name) != w}


def _resized(module: nn.Module, cin: int, cout: int) -> nn.Module:
    """A fresh layer like `module` with other widths."""
    if isinstance(module, nn.Conv2d):
        return nn.Conv2d(
            cin, cout, module.kernel_size, module.stride, module.padding, module.dilation,
            module.groups, module.bias is not None, module.padding_mode,
        )  # fmt: skip
    if isinstance(module, nn.Linear):
        return nn.Linear(cin, cout, module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(cout, module.eps, module.momentum, module.affine)
    if isinstance(module, nn.GroupNorm):
        return nn.GroupNorm(module.num_groups, cout, module.eps, module.affine)
    raise ValueError(f"cannot resize a {type(module).__name__}")
