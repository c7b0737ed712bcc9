"""How batches run on the device: autocast dtype, memory format, loss scaling, and the CUDA settings they imply.

    policy = device_policy(config, ctx.device)   # also turns on cudnn.benchmark and TF32 matmuls on CUDA
    with policy.autocast():
        logits = model(policy.inputs(images))   # uint8 [B, 1, H, W] from the loader, moved without a sync

train.py, evaluate.py, explain.py, the Python API and the benchmark all build their policy here, so every one
of them measures and runs the same settings.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DevicePolicy:
    """Autocast dtype (None = off), memory format and fp16 loss scaling for one device."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    @property
    def uses_grad_scaler(self) -> bool:
        return self.amp_dtype == torch.float16

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Loader images (uint8 [B, 1, H, W]) on the device; the model normalizes them itself."""
        return images.to(self.device, non_blocking=True)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move `model` to the device in the policy's memory format (in place; returns it)."""
        return model.to(self.device, memory_format=self.memory_format)

    def describe(self) -> str:
        amp = "off" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        return f"device {self.device}, AMP {amp}, {'channels_last' if self.channels_last else 'contiguous'}"


def configure_cuda() -> None:
    """Settings every CUDA run of this project uses: cuDNN autotuning (fixed input sizes) and TF32 matmuls."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def device_policy(config: Any, device: torch.device) -> DevicePolicy:
    """Resolve --amp / --amp-dtype / --channels-last for `device`; on CUDA also apply configure_cuda()."""
    cuda = device.type == "cuda"
    if cuda:
        configure_cuda()
    amp = config.amp == "on" or (config.amp == "auto" and cuda)
    dtype = None
    if amp:
        if config.amp_dtype == "fp16" and cuda:
            dtype = torch.float16
        elif config.amp_dtype == "bf16" or not cuda or torch.cuda.is_bf16_supported():
            dtype = torch.bfloat16  # CPU autocast has no fp16 loss-scaling path
        else:
            dtype = torch.float16
    return DevicePolicy(device, dtype, config.channels_last == "on")
