"""DenseNet121 trunk with the original design's head: pool -> BatchNorm -> dense+ReLU+dropout -> 14 logits.

    model = build_model(weights="imagenet")       # or "none", or a path to a state dict / checkpoint
    logits = model(gray)                          # gray: [B, 1, H, W], uint8 or float in [0, 255]
    features = model.forward_features(gray)       # [B, 1024, H/32, W/32], after the final ReLU
    logits = model.forward_head(features)         # [B, 14]; no sigmoid: the loss takes logits
    small = build_model("none", output_stride=8)  # [B, 1024, H/8, W/8]: finer Grad-CAM maps for small inputs
    sharp = build_model("none", pool="lse", lse_r=10.0)  # log-sum-exp pooling of the last map (Wang et al. 2017)

The first layer, `ImageNetNormalization`, turns 1-channel [0, 255] images into the 3-channel ImageNet-normalized
input the trunk's weights expect. It is part of the model (non-persistent buffers: state dicts are unchanged)
so that the training loop, evaluation, Grad-CAM and every exported model apply it exactly once.

The trunk is split into stages so that fine-tuning can unfreeze the last N dense blocks.

`output_stride` 16 or 8 runs the last one or two dense blocks "a trous" (Holschneider et al. 1989; the
dilated-backbone trick of DeepLab): their transitions stop subsampling, and the 3x3 convolutions after them
dilate by the factor lost, so the weights (ImageNet's included) keep their meaning and the stride-32 network's
feature map is exactly every 2nd (4th) position of the finer one. The last map, and with it Grad-CAM, gets
2x (4x) finer in each direction, for about 1.3x (2.4x) the training step time at 64 px on CPU.

`pool` chooses how the last map becomes one vector per image: `avg` (the original design), `max`, or `lse`,
Wang et al. 2017's log-sum-exp pooling (1/r) log(mean exp(r x)), which tends to `avg` as r -> 0 and to `max`
as r -> infinity; a larger sharpness r rewards a few strongly activated positions, i.e. local evidence.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

from cxr.errors import ConfigError, CxrError
from cxr.labels import NUM_CLASSES

# Trunk stages from the input side; unfreezing N blocks unfreezes the last N of the first four.
STAGES: dict[str, tuple[str, ...]] = {
    "stem": ("conv0", "norm0"),
    "block1": ("denseblock1", "transition1"),
    "block2": ("denseblock2", "transition2"),
    "block3": ("denseblock3", "transition3"),
    "block4": ("denseblock4", "norm5"),
}
DENSE_BLOCKS = ("block1", "block2", "block3", "block4")
FEATURE_CHANNELS = 1024
# Transitions that stop subsampling for each output stride; the dense blocks after them dilate.
OUTPUT_STRIDES: dict[int, tuple[str, ...]] = {32: (), 16: ("transition3",), 8: ("transition2", "transition3")}
POOLS = ("avg", "lse", "max")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageNetNormalization(nn.Module):
    """[B, 1, H, W] gray in [0, 255] (any dtype) -> [B, 3, H, W] float, ImageNet mean/std per channel."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # (x / 255 - mean) / std as one multiply-add; broadcasting the gray channel makes the 3 copies.
        self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected gray images [B, 1, H, W] with values in [0, 255], got shape {tuple(images.shape)}")
        return torch.addcmul(self.shift, images.float(), self.scale)


class WeightsUnavailableError(CxrError, RuntimeError):
    """The ImageNet weights could not be downloaded; the message says how to pass a local file."""


class CXRNet(nn.Module):
    """DenseNet121 features + multi-label head; frozen stages keep their BatchNorm in eval mode."""

    def __init__(self, num_classes: int = NUM_CLASSES, hidden: tuple[int, ...] = (512,), dropout: float = 0.5,
                 output_stride: int = 32, pool: str = "avg", lse_r: float = 10.0):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool == "lse" and not lse_r > 0:
            raise ConfigError(f"--lse-r (the log-sum-exp sharpness) must be positive, got {lse_r!r}")
        self.pool, self.lse_r = pool, float(lse_r)
        self.normalize = ImageNetNormalization()
        self.features = densenet121(weights=None).features
        set_output_stride(self.features, output_stride)
        self.output_stride = output_stride
        layers: list[nn.Module] = [nn.BatchNorm1d(FEATURE_CHANNELS)]
        width = FEATURE_CHANNELS
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.head = nn.Sequential(*layers)
        self.frozen_stages: set[str] = set()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Gray [B, 1, H, W] in [0, 255] -> the last feature map [B, 1024, h, w]."""
        inputs = self.normalize(images)
        if self.features.conv0.weight.is_contiguous(memory_format=torch.channels_last):
            inputs = inputs.contiguous(memory_format=torch.channels_last)  # a channels_last model gets channels_last input
        # Not in place (torchvision's is): Grad-CAM hooks this tensor.
        return F.relu(self.features(inputs))

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The last map [B, 1024, h, w] -> logits [B, 14], through the configured global pooling."""
        return self.head(global_pool(feature_map, self.pool, self.lse_r))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return [getattr(self.features, name) for name in STAGES[stage]]

    def set_trainable_stages(self, trainable: set[str]) -> None:
        """Freeze every trunk stage not in `trainable` (the head always trains)."""
        unknown = trainable - set(STAGES)
        if unknown:
            raise ValueError(f"unknown trunk stages {sorted(unknown)}; choose from {list(STAGES)}")
        self.frozen_stages = set(STAGES) - trainable
        for stage in STAGES:
            for module in self.stage_modules(stage):
                module.requires_grad_(stage in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> CXRNet:
        super().train(mode)
        for stage in self.frozen_stages:  # frozen BatchNorm keeps its running statistics
            for module in self.stage_modules(stage):
                module.eval()
        return self

    def set_memory_efficient(self, enabled: bool) -> CXRNet:
        """Checkpoint every dense layer (torchvision's memory_efficient): recomputed in backward, same weights.

        The recomputation would move the first BatchNorm's running statistics a second time per step; hooks
        restore them, so the statistics equal those of a plain run.
        """
        for module in self.features.modules():
            if hasattr(module, "memory_efficient"):
                module.memory_efficient = bool(enabled)
                if enabled and not getattr(module.norm1, "_cxr_recompute_hooks", False):
                    module.norm1.register_forward_pre_hook(_save_stats_in_backward)
                    module.norm1.register_forward_hook(_restore_stats_in_backward)
                    module.norm1._cxr_recompute_hooks = True
        return self

    def trunk_parameters(self) -> list[nn.Parameter]:
        return list(self.features.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


def global_pool(feature_map: torch.Tensor, pool: str = "avg", lse_r: float = 10.0) -> torch.Tensor:
    """[B, C, h, w] -> [B, C] by average, max or log-sum-exp (1/r) log(mean exp(r x)) over the positions."""
    flat = feature_map.flatten(2)
    if pool == "avg":
        return flat.mean(dim=2)
    if pool == "max":
        return flat.amax(dim=2)
    if pool == "lse":
        # logsumexp subtracts the max internally, so large r * x never overflows.
        return (torch.logsumexp(lse_r * flat, dim=2) - math.log(flat.shape[2])) / lse_r
    raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # what torch.utils.checkpoint itself uses to detect recomputation


def _save_stats_in_backward(module: nn.BatchNorm2d, _: Any) -> None:
    if module.training and module.track_running_stats and _in_backward():
        module._cxr_saved_stats = [buffer.clone() for buffer in module.buffers()]


def _restore_stats_in_backward(module: nn.BatchNorm2d, _: Any, __: Any) -> None:
    saved = module.__dict__.pop("_cxr_saved_stats", None)
    if saved is not None:
        with torch.no_grad():
            for buffer, value in zip(module.buffers(), saved):
                buffer.copy_(value)


class _DilatedAvgPool(nn.Module):
    """The transitions' 2x2 average pool without subsampling: mean of x[p], x[p + d] per axis, same size out."""

    def __init__(self, dilation: int):
        super().__init__()
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        height, width = x.shape[-2:]
        padded = F.pad(x, (0, d, 0, d), mode="replicate")  # only the last d rows/columns read the padding
        rows = padded[..., :height, :] + padded[..., d:, :]
        return (rows[..., :width] + rows[..., d:]) * 0.25


def set_output_stride(features: nn.Module, output_stride: int) -> None:
    """Make torchvision DenseNet121 `features` (fresh, stride 32) produce a map of stride 32, 16 or 8."""
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(f"--output-stride must be one of {sorted(OUTPUT_STRIDES)}, got {output_stride!r}")
    dilation = 1
    for name in ("transition2", "denseblock3", "transition3", "denseblock4"):
        module = getattr(features, name)
        if name in OUTPUT_STRIDES[output_stride]:
            module.pool = _DilatedAvgPool(dilation)  # pools at the dilation of the block before it
            dilation *= 2
        elif name.startswith("denseblock") and dilation > 1:
            for conv in module.modules():
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)


def stages_to_unfreeze(unfreeze: str | int) -> set[str]:
    """`--unfreeze N` -> the last N dense blocks; `all` -> every stage including the stem."""
    if str(unfreeze) == "all":
        return set(STAGES)
    count = int(unfreeze)
    if not 0 <= count <= len(DENSE_BLOCKS):
        raise ConfigError(f"--unfreeze must be 0..{len(DENSE_BLOCKS)} or 'all', got {unfreeze!r}")
    return set(DENSE_BLOCKS[len(DENSE_BLOCKS) - count:])


# Old torchvision DenseNet files name layers 'norm.1' where the module now says 'norm1'.
_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$")


def _trunk_state_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    trunk = {}
    for key, value in state.items():
        match = _OLD_KEY.match(key)
        if match:
            key = match.group(1) + match.group(2)
        if key.startswith("features."):
            trunk[key[len("features."):]] = value
    return trunk


def load_imagenet_trunk(model: CXRNet) -> None:
    """Copy torchvision's ImageNet DenseNet121 weights into the trunk (downloads once, then cached)."""
    try:
        state = DenseNet121_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
    except Exception as error:  # URLError, SSL errors, proxies: all mean "no download"
        url = DenseNet121_Weights.IMAGENET1K_V1.url
        raise WeightsUnavailableError(
            f"could not download the ImageNet DenseNet121 weights ({type(error).__name__}: {error}).\n"
            f"Offline? Fetch {url} on a machine with internet and pass the file: "
            f"--weights /path/to/{url.rsplit('/', 1)[-1]}  (or --weights none to train from scratch)"
        ) from error
    model.features.load_state_dict(_trunk_state_from_torchvision(state))


def load_weights_file(model: CXRNet, path: str | Path) -> str:
    """Load a torchvision DenseNet121 state dict (trunk only) or one of our checkpoints (whole model)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--weights {path}: no such file (use 'imagenet', 'none' or a path to a .pth/.pt file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ConfigError(f"--weights {path}: not a loadable weights file ({error})") from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as error:
            raise ConfigError(f"--weights {path}: a checkpoint of another architecture ({str(error)[:300]}...); "
                              "pass --hidden/--output-stride as it was trained, or a DenseNet121 trunk file") from error
        return "checkpoint"
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    trunk = _trunk_state_from_torchvision(state) if isinstance(state, dict) else {}
    if not trunk:
        raise ConfigError(f"--weights {path}: holds no DenseNet 'features.*' weights and is not a cxr checkpoint")
    try:
        model.features.load_state_dict(trunk)
    except RuntimeError as error:
        raise ConfigError(f"--weights {path}: not DenseNet121 weights ({str(error)[:300]}...)") from error
    return "torchvision"


def build_model(weights: str = "none", hidden: tuple[int, ...] = (512,), dropout: float = 0.5,
                output_stride: int = 32, pool: str = "avg", lse_r: float = 10.0, memory_efficient: bool = False) -> CXRNet:
    """The network with its trunk initialised from `weights`: 'imagenet', 'none' or a file path."""
    model = CXRNet(hidden=hidden, dropout=dropout, output_stride=output_stride, pool=pool, lse_r=lse_r)
    if memory_efficient:
        model.set_memory_efficient(True)
    if weights == "imagenet":
        load_imagenet_trunk(model)
    elif weights != "none":
        load_weights_file(model, weights)
    return model
