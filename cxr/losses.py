"""Multi-label loss for the 14 findings: BCE-with-logits with label smoothing, NaN masking and pos_weight.

The model outputs logits (no sigmoid): `binary_cross_entropy_with_logits` is numerically safe under
autocast, while sigmoid + `BCELoss` is not.

Example:
    >>> import numpy as np, torch
    >>> from cxr.losses import LabelSmoothedBCE, pos_weight_from_labels
    >>> train_labels = np.array([[1, 0], [0, 0], [0, float("nan")], [0, 1]])
    >>> criterion = LabelSmoothedBCE(smoothing=0.1, pos_weight=pos_weight_from_labels(train_labels))
    >>> loss = criterion(torch.zeros(4, 2), torch.as_tensor(train_labels))  # NaN cell is ignored
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class LabelSmoothedBCE(nn.Module):
    """BCE-with-logits on targets smoothed toward 0.5, averaged over the known (non-NaN) label cells."""

    def __init__(self, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if not (math.isfinite(smoothing) and 0.0 <= smoothing < 1.0):
            raise ValueError(
                f"--label-smoothing must be in [0, 1), got {smoothing}; "
                "0 disables smoothing and 0.1 is a common choice"
            )
        self.smoothing = float(smoothing)
        # A buffer so that `.to(device)` moves it with the module; float32 because the loss is float32.
        weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        self.register_buffer("pos_weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the mean loss over known cells of `targets` [B, C] (NaN = unknown; 0 if none known)."""
        if logits.shape != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
        # Under autocast the logits may be bf16/fp16; the loss itself is computed in float32.
        logits = logits.float()
        targets = targets.to(device=logits.device, dtype=torch.float32)
        known = ~torch.isnan(targets)
        # Filling unknown cells with 0 keeps NaN out of the per-cell loss (NaN * 0 is still NaN).
        smoothed = torch.where(known, targets, torch.zeros_like(targets))
        smoothed = smoothed * (1.0 - self.smoothing) + 0.5 * self.smoothing
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        per_cell = F.binary_cross_entropy_with_logits(logits, smoothed, pos_weight=pos_weight, reduction="none")
        known_float = known.float()
        # clamp: with no known cell the loss is 0 but still attached to the graph, so backward() works.
        return (per_cell * known_float).sum() / known_float.sum().clamp(min=1.0)

    def extra_repr(self) -> str:
        return f"smoothing={self.smoothing}, pos_weight={'none' if self.pos_weight is None else 'set'}"


def pos_weight_from_labels(labels: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """Per-class negatives/positives from training labels [N, C] (NaN ignored), clipped to [1/max, max].

    Choices: a class with no positive gets `max_weight` (it has nothing to up-weight, and the value
    stays finite); a class with no negative gets `1 / max_weight` rather than 0, which would silence
    its positives entirely; a class with no known label at all gets 1 (neutral).
    """
    if not max_weight >= 1.0 or not math.isfinite(max_weight):
        raise ValueError(f"max_weight must be a finite number >= 1, got {max_weight}")
    labels = np.asarray(labels, dtype=np.float64)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D array [samples, classes], got shape {labels.shape}")
    known = ~np.isnan(labels)
    positives = np.sum((labels > 0.5) & known, axis=0).astype(np.float64)
    negatives = np.sum((labels <= 0.5) & known, axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = negatives / positives
    ratio = np.where(positives == 0, max_weight, ratio)
    ratio = np.clip(ratio, 1.0 / max_weight, max_weight)
    ratio = np.where(known.sum(axis=0) == 0, 1.0, ratio)
    return torch.as_tensor(ratio, dtype=torch.float32)
