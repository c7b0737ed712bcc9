"""Tests for cxr.losses: smoothing arithmetic, NaN masking, pos_weight, argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr.labels import NUM_CLASSES
from cxr.losses import LabelSmoothedBCE, pos_weight_from_labels


def manual_bce(logit: float, target: float, pos_weight: float = 1.0) -> float:
    """Textbook weighted BCE on one logit, written out without torch."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(pos_weight * target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def test_smoothing_arithmetic_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0]])
    targets = torch.tensor([[1.0, 0.0]])
    # eps=0.1: target 1 -> 0.95 and target 0 -> 0.05.
    expected = (manual_bce(2.0, 0.95) + manual_bce(-1.0, 0.05)) / 2
    loss = LabelSmoothedBCE(smoothing=0.1)(logits, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() != pytest.approx((manual_bce(2.0, 1.0) + manual_bce(-1.0, 0.0)) / 2, rel=1e-3)


def test_zero_smoothing_equals_plain_bce_with_logits() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, NUM_CLASSES, generator=generator)
    targets = (torch.rand(8, NUM_CLASSES, generator=generator) > 0.7).float()
    expected = torch.nn.BCEWithLogitsLoss()(logits, targets)
    assert torch.allclose(LabelSmoothedBCE()(logits, targets), expected, atol=1e-7)


def test_nan_targets_are_masked_out() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=generator, requires_grad=True)
    targets = (torch.rand(6, 4, generator=generator) > 0.5).float()
    targets[0, 1] = float("nan")
    targets[3, :] = float("nan")
    known = ~torch.isnan(targets)
    criterion = LabelSmoothedBCE(smoothing=0.2)
    loss = criterion(logits, targets)
    smoothed_known = targets[known] * 0.8 + 0.1
    expected = F.binary_cross_entropy_with_logits(logits[known], smoothed_known)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.all(logits.grad[~known] == 0)
    assert torch.all(logits.grad[known] != 0)


def test_all_unknown_gives_zero_loss_with_grad() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    loss = LabelSmoothedBCE(smoothing=0.1)(logits, torch.full((2, 3), float("nan")))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 3))


def test_pos_weight_matches_torch_formula() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 3, generator=generator)
    targets = (torch.rand(5, 3, generator=generator) > 0.5).float()
    pos_weight = torch.tensor([1.0, 3.0, 10.0])
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, targets)
    assert LabelSmoothedBCE(pos_weight=pos_weight)(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    # One cell by hand: smoothing and pos_weight together.
    one = LabelSmoothedBCE(smoothing=0.1, pos_weight=torch.tensor([4.0]))(torch.tensor([[0.5]]), torch.tensor([[1.0]]))
    assert one.item() == pytest.approx(manual_bce(0.5, 0.95, pos_weight=4.0), rel=1e-6)


def test_low_precision_logits_give_float32_loss() -> None:
    logits = torch.randn(4, 3).to(torch.bfloat16)
    targets = (torch.rand(4, 3) > 0.5).float()
    loss = LabelSmoothedBCE(smoothing=0.1)(logits, targets)
    assert loss.dtype == torch.float32
    expected = LabelSmoothedBCE(smoothing=0.1)(logits.float(), targets)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pos_weight_moves_with_module_and_is_in_state_dict() -> None:
    criterion = LabelSmoothedBCE(pos_weight=torch.tensor([2.0, 5.0]))
    assert torch.equal(criterion.state_dict()["pos_weight"], torch.tensor([2.0, 5.0]))
    assert criterion.to(torch.float64).pos_weight.dtype == torch.float64


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_smoothing_names_the_flag(bad: float) -> None:
    with pytest.raises(ValueError, match=r"--label-smoothing must be in \[0, 1\)"):
        LabelSmoothedBCE(smoothing=bad)


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match=r"logits \(2, 3\) and targets \(2, 4\)"):
        LabelSmoothedBCE()(torch.zeros(2, 3), torch.zeros(2, 4))


def test_pos_weight_from_labels_values() -> None:
    nan = float("nan")
    labels = np.array(
        [
            # ratio 3/1, NaN-aware 2/1, no positive, no negative, all unknown
            [1, 1, 0, 1, nan],
            [0, 0, 0, 1, nan],
            [0, nan, 0, 1, nan],
            [0, 0, 0, 1, nan],
        ]
    )
    weights = pos_weight_from_labels(labels, max_weight=50.0)
    assert weights.dtype == torch.float32
    assert weights.tolist() == pytest.approx([3.0, 2.0, 50.0, 1.0 / 50.0, 1.0])


def test_pos_weight_from_labels_clips_rare_classes() -> None:
    labels = np.zeros((1000, 2))
    labels[0, 0] = 1  # 999 negatives per positive
    labels[:500, 1] = 1
    assert pos_weight_from_labels(labels, max_weight=100.0).tolist() == pytest.approx([100.0, 1.0])


def test_pos_weight_from_labels_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D array"):
        pos_weight_from_labels(np.zeros(5))
    with pytest.raises(ValueError, match="max_weight"):
        pos_weight_from_labels(np.zeros((2, 2)), max_weight=0.5)
