"""Occlusion sensitivity (Zeiler & Fergus 2014): the model-agnostic reference for where a model looks.

    occlusion = Occlusion(model, patch=8, stride=4, batch_size=256)
    maps, logits = occlusion(images)              # maps [B, 14, H, W] in [0, 1], logits [B, 14]
    maps, _ = occlusion(images, [4, 7])           # only these classes' maps (the forwards are the same)

A patch of `patch` x `patch` pixels, filled with the image's own mean, slides over the image with step
`stride` (the last position always touches the right and bottom borders); each occluded copy goes through
the model, many copies per forward. The map at a pixel is the mean drop of the class probability over the
patches that cover it; drops below zero (occluding made the class more likely) are clipped, and each map is
divided by its maximum, as the CAM maps are. Every class comes out of the same forwards, so 14 maps cost
as much as one: about positions(H) * positions(W) forwards per image (225 at 64 px with 8 / 4), which makes
it the slow reference, not the method for 1024 px images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cxr.errors import ConfigError
from cxr.gradcam import _eval_mode, class_index_table, normalise_maps


def patch_positions(size: int, patch: int, stride: int) -> list[int]:
    """Top-left offsets along one axis: every `stride` pixels, plus one flush with the far border."""
    if patch < 1 or stride < 1:
        raise ConfigError(f"--occlusion-patch and --occlusion-stride must be at least 1 pixel, got {patch} and {stride}")
    if patch > size:
        raise ConfigError(f"--occlusion-patch {patch} is larger than the {size} px network input: choose at most {size}")
    positions = list(range(0, size - patch + 1, stride))
    if positions[-1] != size - patch:
        positions.append(size - patch)
    return positions


class Occlusion:
    """Probability drop under a sliding mean-filled patch, for every class of a batch of images."""

    def __init__(self, model: nn.Module, patch: int = 8, stride: int = 4, batch_size: int = 256):
        if batch_size < 1:
            raise ConfigError(f"occlusion batch size must be at least 1, got {batch_size}")
        self.model, self.patch, self.stride, self.batch_size = model, patch, stride, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, class_indices: Sequence[int] | torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps [B, K, H, W] in [0, 1] for the K classes asked (all if None), and the unoccluded logits [B, C]."""
        if images.dim() != 4:
            raise ValueError(f"occlusion expects images shaped [B, C, H, W], got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        rows = patch_positions(height, self.patch, self.stride)
        cols = patch_positions(width, self.patch, self.stride)
        with _eval_mode(self.model):
            logits = self.model(images).float()
            table = class_index_table(class_indices, logits.shape[0], logits.shape[1], logits.device)
            maps = torch.stack([self._one_image(image, torch.sigmoid(logit), rows, cols)
                                for image, logit in zip(images, logits)])
        maps = maps.gather(1, table[:, :, None, None].expand(-1, -1, height, width))
        return normalise_maps(maps, (height, width)), logits

    def _one_image(self, image: torch.Tensor, probabilities: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
        """[C, H, W] mean probability drop per pixel, over the patches covering it."""
        positions = [(row, col) for row in rows for col in cols]
        fill = image.float().mean().to(image.dtype)
        drops = []
        for start in range(0, len(positions), self.batch_size):
            chunk = positions[start:start + self.batch_size]
            copies = image.unsqueeze(0).repeat(len(chunk), 1, 1, 1)
            for copy, (row, col) in zip(copies, chunk):
                copy[:, row:row + self.patch, col:col + self.patch] = fill
            drops.append(probabilities - torch.sigmoid(self.model(copies).float()))
        drop = torch.cat(drops).clamp_min(0.0)  # [P, C]
        classes = drop.shape[1]
        total = torch.zeros(classes, *image.shape[-2:], device=drop.device)
        coverage = torch.zeros(image.shape[-2:], device=drop.device)
        for (row, col), values in zip(positions, drop):
            total[:, row:row + self.patch, col:col + self.patch] += values[:, None, None]
            coverage[row:row + self.patch, col:col + self.patch] += 1
        return total / coverage
