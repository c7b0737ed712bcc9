"""The Grad-CAM family written from scratch: several classes of several images in one call.

Methods (`method=`), all from the activations A [C, h, w] of one layer and the gradients g = dy_k/dA:
- `gradcam` (Selvaraju et al. 2017): ReLU(sum_c mean_ij(g_c) A_c), one weight per channel;
- `gradcam++` (Chattopadhyay et al. 2018): channel weights from positive gradients with alpha coefficients;
- `layercam` (Jiang et al. 2021): ReLU(sum_c ReLU(g_c) * A_c), element-wise, so it keeps the fine detail of
  earlier layers where channel-wide weights blur it;
- `hirescam` (Draelos & Carin 2020): ReLU(sum_c g_c * A_c), element-wise; for a head that is linear in the
  map (mean pooling, then one linear layer) it sums exactly to the class score, i.e. it is faithful there.

    cam = GradCAM(model)                                     # fast path: the map out of model.forward_features
    maps, logits = cam(images, class_indices=range(14))      # maps [B, 14, H, W] in [0, 1], logits [B, 14]
    cam3 = GradCAM(model, target_layer=model.features.denseblock3, method="gradcam++")
    maps, _ = cam3(images, torch.tensor([[2], [7]]))         # one class per image -> [2, 1, H, W]
    boxes = heatmap_to_boxes(maps[0, 0].numpy(), scale=(1024 / 224, 1024 / 224))

Fast path (`target_layer=None`, needs `forward_features` / `forward_head`): the trunk runs once without
autograd and only the head is differentiated, from a detached copy of the feature map, so all 14 class maps
cost about one forward pass. For a mean-pooled head this is the analytic shortcut dy/dA_cij = (dy/dp_c)/(h*w);
taking the gradient at every location instead of at p keeps it exact for any other head too.

General path (any module of the model, which then only needs `model(x) -> logits`): a forward hook swaps the
layer's output for a detached leaf tensor (plus a clone, so in-place ops downstream, like torchvision DenseNet's
ReLU, cannot touch it) and `torch.autograd.grad` differentiates each class score with respect to that leaf only.
No full backward hooks, gradients never flow below the layer, parameters' `.grad` are never written, and the
hook is removed when the call ends, exceptions included. Layers that run inside activation checkpointing, or
more than once per forward, are not supported.

Both paths run the model in eval mode (the head's BatchNorm1d and Dropout would otherwise couple the images of
a batch or randomise the scores) and restore every submodule's own mode afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METHODS", "GradCAM"]

METHODS = ("gradcam", "gradcam++", "layercam", "hirescam")


class GradCAM:
    """Class activation maps (any of METHODS) for a model giving class logits."""

    def __init__(self, model: nn.Module, target_layer: nn.Module | None = None, method: str = "gradcam"):
        if method not in METHODS:
            raise ValueError(f"GradCAM method must be one of {METHODS}, got {method!r}")
        if target_layer is None and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ValueError(
                f"{type(model).__name__} has no forward_features/forward_head, so GradCAM needs "
                "target_layer=<one of its modules> (for example its last convolutional block)"
            )
        if target_layer is not None and not any(module is target_layer for module in model.modules()):
            raise ValueError(f"target_layer {type(target_layer).__name__} is not a submodule of {type(model).__name__}")
        self.model = model
        self.target_layer = target_layer
        self.method = method

    def __call__(
        self, images: torch.Tensor, class_indices: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps [B, K, H, W] in [0, 1] at input resolution for the K classes asked (all if None), and logits [B, C]."""
        if images.dim() != 4:
            raise ValueError(f"GradCAM expects images shaped [B, C, H, W], got {tuple(images.shape)}")
        with _eval_mode(self.model), torch.enable_grad():
            if self.target_layer is None:
                with torch.no_grad():  # nothing flows back through the trunk on this path
                    features = self.model.forward_features(images)
                activation = features.detach().requires_grad_(True)
                logits = self.model.forward_head(activation)
                cams = self._class_cams(activation, logits, class_indices)
            else:
                with _captured_output(self.target_layer) as capture:
                    logits = self.model(images)
                    activation = capture.activation()
                    cams = self._class_cams(activation, logits, class_indices)
        return normalise_maps(cams, tuple(images.shape[-2:])), logits.detach()

    def _class_cams(
        self, activation: torch.Tensor, logits: torch.Tensor, class_indices: Sequence[int] | torch.Tensor | None
    ) -> torch.Tensor:
        """Unnormalised ReLU maps [B, K, h, w] at the layer's resolution, one backward pass per class column."""
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits shaped [B, num_classes], got {tuple(logits.shape)}")
        if activation.dim() != 4:
            raise ValueError(f"the target activation must be [B, C, h, w], got {tuple(activation.shape)}")
        table = class_index_table(class_indices, logits.shape[0], logits.shape[1], logits.device)
        columns = table.shape[1]
        cams = []
        for column in range(columns):
            # Summing over the batch is exact in eval mode: image b's score depends only on image b.
            score = logits.gather(1, table[:, column : column + 1]).sum()
            gradient = None
            if score.requires_grad:
                (gradient,) = torch.autograd.grad(
                    score, activation, retain_graph=column < columns - 1, allow_unused=True
                )
            if gradient is None:  # the score does not depend on this layer at all
                gradient = torch.zeros_like(activation)
            cams.append(cam_from_gradient(activation.detach(), gradient, self.method))
        return torch.stack(cams, dim=1)


def cam_from_gradient(activation: torch.Tensor, gradient: torch.Tensor, method: str = "gradcam") -> torch.Tensor:
    """The method's map [B, h, w] from activations and score gradients [B, C, h, w], before normalisation."""
    activation, gradient = activation.float(), gradient.float()
    if method == "gradcam":
        weights = gradient.mean(dim=(2, 3))
    elif method == "gradcam++":
        # Chattopadhyay et al. 2018 with exp(score): the 2nd/3rd derivatives become powers of the 1st.
        squared = gradient.pow(2)
        denominator = 2 * squared + activation.sum(dim=(2, 3), keepdim=True) * squared * gradient
        nonzero = denominator != 0
        alpha = torch.where(nonzero, squared / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)
        weights = (alpha * F.relu(gradient)).sum(dim=(2, 3))
    elif method == "layercam":
        return F.relu((F.relu(gradient) * activation).sum(dim=1))
    elif method == "hirescam":
        return F.relu((gradient * activation).sum(dim=1))
    else:
        raise ValueError(f"GradCAM method must be one of {METHODS}, got {method!r}")
    return F.relu(torch.einsum("bc,bchw->bhw", weights, activation))


def normalise_maps(cams: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample [B, K, h, w] maps bilinearly to `size` and divide each by its max; all-zero maps stay zero."""
    if tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
    peak = cams.amax(dim=(2, 3), keepdim=True)
    # Dividing by a clamped peak, then masking, keeps 0/0 from ever producing NaN.
    scaled = cams / peak.clamp_min(torch.finfo(cams.dtype).tiny)
    return torch.where(peak > 0, scaled, torch.zeros_like(scaled)).clamp_(0.0, 1.0)


def class_index_table(
    class_indices: Sequence[int] | torch.Tensor | None, batch: int, num_classes: int, device: torch.device
) -> torch.Tensor:
    """[B, K] long tensor of class indices: a list/1-D tensor applies to every image, a [B, K] tensor per image."""
    if class_indices is None:
        table = torch.arange(num_classes, device=device).expand(batch, num_classes)
    else:
        if not isinstance(class_indices, torch.Tensor):
            # Via numpy: torch.as_tensor(list) keeps growing a small interpreter-side cache for a while.
            values = np.asarray(list(class_indices))
            if values.dtype.kind not in "iu" and values.size:
                raise ValueError(f"class_indices must be integers, got {values.dtype} values {values.tolist()}")
            class_indices = torch.from_numpy(values.astype(np.int64))
        if class_indices.is_floating_point() or class_indices.is_complex() or class_indices.dtype == torch.bool:
            raise ValueError(f"class_indices must be integers, got dtype {class_indices.dtype}")
        table = class_indices.to(device=device, dtype=torch.long)
        if table.dim() == 1:
            table = table.expand(batch, table.shape[0])
        elif table.dim() != 2 or table.shape[0] != batch:
            raise ValueError(
                f"class_indices must be a list of class indices or a [batch={batch}, K] tensor, "
                f"got shape {tuple(table.shape)}"
            )
    if table.shape[1] == 0:
        raise ValueError("class_indices is empty: ask for at least one class")
    if table.numel() and (int(table.min()) < 0 or int(table.max()) >= num_classes):
        raise ValueError(f"class_indices must lie in 0..{num_classes - 1} (the model has {num_classes} outputs)")
    return table


class _Capture:
    """What the forward hook saw: the leaf standing in for the layer's output, and how often it ran."""

    def __init__(self) -> None:
        self.leaves: list[torch.Tensor] = []

    def activation(self) -> torch.Tensor:
        if len(self.leaves) != 1:
            raise RuntimeError(
                f"the GradCAM target layer ran {len(self.leaves)} times in one forward pass; "
                "choose a layer the model uses exactly once"
            )
        return self.leaves[0]


@contextmanager
def _captured_output(layer: nn.Module) -> Iterator[_Capture]:
    """Register the capturing forward hook for the duration of the block, and always remove it."""
    capture = _Capture()

    def hook(module: nn.Module, inputs: tuple, output: object) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the GradCAM target layer {type(module).__name__} returned {type(output).__name__}, "
                "not a tensor: choose a layer whose output is one feature map"
            )
        leaf = output.detach().requires_grad_(True)
        capture.leaves.append(leaf)
        return leaf.clone()  # downstream in-place ops modify the clone, never the leaf

    handle = layer.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block in eval mode, then give every submodule back its own training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
