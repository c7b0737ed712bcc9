"""Grad-CAM / Grad-CAM++: analytic maps on hand-built nets, fast path vs hooks, hygiene (hooks, modes, memory)."""

from __future__ import annotations

import gc
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cxr.gradcam import GradCAM, class_index_table
from cxr.model import CXRNet, build_model


class SpatialLinearNet(nn.Module):
    """Features = the input itself; logit k = sum_{c,i,j} V[k,c,i,j] A[c,i,j], so dy_k/dA = V[k] exactly."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.body = nn.Identity()
        self.register_buffer("weights", weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,kchw->bk", feature_map, self.weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class PooledConvNet(nn.Module):
    """A 1x1 conv (known channels), ReLU, mean pool and a linear head: the textbook CAM setting."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.dropout = nn.Dropout(0.5)
        self.linear = nn.Linear(4, classes)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(feature_map.mean(dim=(2, 3))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


class CXRNetWithFinalReLU(CXRNet):
    """CXRNet whose final ReLU is a module, so hooks can target exactly what forward_features returns."""

    def __init__(self):
        super().__init__()
        self.final_relu = nn.ReLU()

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.final_relu(self.features(self.normalize(images)))


def normalised(array: np.ndarray) -> np.ndarray:
    array = np.maximum(array, 0.0)
    return array / array.max() if array.max() > 0 else array


def expected_spatial_maps(images: torch.Tensor, weights: torch.Tensor, method: str) -> np.ndarray:
    """The formulas written out in float64 numpy, per image and class, for SpatialLinearNet."""
    activations, gradients = images.double().numpy(), weights.double().numpy()
    maps = np.zeros((activations.shape[0], gradients.shape[0]) + activations.shape[2:])
    for b, activation in enumerate(activations):
        for k, gradient in enumerate(gradients):
            if method == "layercam":  # element-wise: positive gradients times activations, summed over channels
                maps[b, k] = normalised((np.maximum(gradient, 0) * activation).sum(axis=0))
                continue
            if method == "hirescam":  # element-wise: gradients times activations, summed over channels
                maps[b, k] = normalised((gradient * activation).sum(axis=0))
                continue
            if method == "gradcam":
                channel_weights = gradient.mean(axis=(1, 2))
            else:
                sums = activation.sum(axis=(1, 2), keepdims=True)
                denominator = 2 * gradient**2 + sums * gradient**3
                alpha = np.divide(gradient**2, denominator, out=np.zeros_like(gradient), where=denominator != 0)
                channel_weights = (alpha * np.maximum(gradient, 0)).sum(axis=(1, 2))
            maps[b, k] = normalised(np.tensordot(channel_weights, activation, axes=1))
    return maps


@pytest.fixture(scope="module")
def spatial_net() -> SpatialLinearNet:
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(4, 3, 6, 6, generator=generator)
    weights[2] = 0.0  # class 2: all-zero gradient
    weights[3] = -weights[3].abs()  # class 3: negative weights on positive activations, ReLU map all zero
    return SpatialLinearNet(weights)


@pytest.fixture(scope="module")
def spatial_images() -> torch.Tensor:
    return torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) + 0.05


@pytest.fixture(scope="module")
def cxrnet() -> CXRNet:
    torch.manual_seed(0)
    return build_model("none").eval()


@pytest.fixture(scope="module")
def xray_batch() -> torch.Tensor:
    return torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(2)) * 255  # gray, as the model takes


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
@pytest.mark.parametrize("use_hooks", [False, True])
def test_maps_equal_the_formula_on_a_hand_built_net(spatial_net, spatial_images, method, use_hooks):
    cam = GradCAM(spatial_net, target_layer=spatial_net.body if use_hooks else None, method=method)
    maps, logits = cam(spatial_images, [0, 1, 2, 3])
    expected = expected_spatial_maps(spatial_images, spatial_net.weights, method)
    assert maps.shape == (2, 4, 6, 6) and maps.dtype == torch.float32
    np.testing.assert_allclose(maps.numpy(), expected, atol=1e-6)
    assert torch.allclose(logits, spatial_net(spatial_images))
    assert maps[:, :2].amax(dim=(2, 3)).eq(1.0).all()  # live maps peak at exactly 1


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
def test_dead_classes_give_zero_maps_not_nan(spatial_net, spatial_images, method):
    maps, _ = GradCAM(spatial_net, method=method)(spatial_images, [2, 3])
    assert not torch.isnan(maps).any()
    assert maps.abs().sum() == 0


def test_mean_pooled_net_map_is_relu_of_weighted_channels():
    torch.manual_seed(3)
    model = PooledConvNet()
    images = torch.rand(3, 3, 5, 7)
    maps, _ = GradCAM(model)(images, [0, 1, 2])
    activations = model.body(images).detach().double().numpy()
    head = model.linear.weight.detach().double().numpy()
    for b in range(3):
        for k in range(3):
            expected = normalised(np.tensordot(head[k], activations[b], axes=1))
            np.testing.assert_allclose(maps[b, k].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
def test_fast_path_equals_hooks_on_the_final_layer_of_cxrnet(xray_batch, method):
    torch.manual_seed(0)
    model = CXRNetWithFinalReLU().eval()
    classes = [0, 5, 13]
    fast_maps, fast_logits = GradCAM(model, method=method)(xray_batch, classes)
    hook_maps, hook_logits = GradCAM(model, target_layer=model.final_relu, method=method)(xray_batch, classes)
    assert fast_maps.abs().sum() > 0
    torch.testing.assert_close(fast_maps, hook_maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast_logits, hook_logits)


def test_cxrnet_maps_have_the_right_shape_range_and_differ_between_classes(cxrnet, xray_batch):
    maps, logits = GradCAM(cxrnet)(xray_batch, range(14))
    assert maps.shape == (2, 14, 64, 64) and logits.shape == (2, 14)
    assert maps.min() >= 0 and maps.max() == 1 and not torch.isnan(maps).any()
    for image_maps in maps:  # a random head leaves some classes with an all-zero map; the rest must vary
        distinct = torch.unique(image_maps.flatten(1).mul(1e4).round(), dim=0)
        assert len(distinct) >= 6


def test_gradcam_plus_plus_differs_but_stays_in_unit_range(cxrnet, xray_batch):
    plain, _ = GradCAM(cxrnet)(xray_batch, range(14))
    plus, _ = GradCAM(cxrnet, method="gradcam++")(xray_batch, range(14))
    assert plus.min() >= 0 and plus.max() <= 1 and not torch.isnan(plus).any()
    assert (plain - plus).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [None, "denseblock3"])
def test_several_classes_in_one_call_equal_separate_calls(cxrnet, xray_batch, layer):
    target = getattr(cxrnet.features, layer) if layer else None
    cam = GradCAM(cxrnet, target_layer=target)
    together, _ = cam(xray_batch, [1, 4, 9])
    for column, class_index in enumerate([1, 4, 9]):
        alone, _ = cam(xray_batch, [class_index])
        torch.testing.assert_close(together[:, column], alone[:, 0], atol=1e-6, rtol=1e-5)
    per_image, _ = cam(xray_batch, torch.tensor([[2, 7], [11, 0]]))
    for b, row in enumerate([[2, 7], [11, 0]]):
        single, _ = cam(xray_batch[b : b + 1], row)
        torch.testing.assert_close(per_image[b], single[0], atol=1e-5, rtol=1e-4)


def test_general_path_leaves_parameter_grads_and_hooks_alone(cxrnet, xray_batch):
    layer = cxrnet.features.denseblock3
    maps, _ = GradCAM(cxrnet, target_layer=layer, method="gradcam++")(xray_batch, [0, 1])
    assert maps.shape == (2, 2, 64, 64) and maps.max() == 1
    assert all(parameter.grad is None for parameter in cxrnet.parameters())
    assert all(len(module._forward_hooks) == 0 for module in cxrnet.modules())


def test_hooks_are_removed_when_the_call_raises(cxrnet, xray_batch):
    layer = cxrnet.features.denseblock4
    with pytest.raises(ValueError, match=r"class_indices must lie in 0\.\.13"):
        GradCAM(cxrnet, target_layer=layer)(xray_batch, [3, 14])
    assert len(layer._forward_hooks) == 0

    class PairOutput(nn.Module):
        def forward(self, images):
            return images, images

    class PairNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = PairOutput()

        def forward(self, images):
            return self.pair(images)[0].mean(dim=(2, 3))

    model = PairNet()
    with pytest.raises(TypeError, match="returned tuple, not a tensor"):
        GradCAM(model, target_layer=model.pair)(torch.rand(1, 3, 4, 4), [0])
    assert len(model.pair._forward_hooks) == 0


def test_modes_are_restored_and_eval_mode_is_used(cxrnet, xray_batch):
    model = build_model("none", dropout=0.9)
    model.set_trainable_stages({"block4"})
    model.train()
    before = [module.training for module in model.modules()]
    running_mean = model.head[0].running_mean.clone()
    for target in (None, model.features.denseblock4):
        _, logits = GradCAM(model, target_layer=target)(xray_batch, [0])
        assert [module.training for module in model.modules()] == before
        assert torch.equal(model.head[0].running_mean, running_mean)  # no BatchNorm update happened
        with torch.no_grad():
            torch.testing.assert_close(logits, model.eval()(xray_batch))  # no dropout happened
        model.train()
    assert not model.features.conv0.training  # the frozen stem kept its eval mode throughout


def test_works_inside_no_grad_and_on_frozen_models(spatial_images):
    torch.manual_seed(4)
    model = PooledConvNet().requires_grad_(False)
    reference, _ = GradCAM(model)(spatial_images, [0, 1])
    with torch.no_grad():
        fast, _ = GradCAM(model)(spatial_images, [0, 1])
        hooked, _ = GradCAM(model, target_layer=model.body)(spatial_images, [0, 1])
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(hooked, reference, atol=1e-6, rtol=1e-5)
    assert reference.abs().sum() > 0


def count_live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on some torch module proxies warns about deprecations
        warnings.simplefilter("ignore")
        return sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())


@pytest.mark.parametrize("use_hooks", [False, True])
def test_memory_stays_flat_over_100_calls(use_hooks):
    torch.manual_seed(5)
    model = PooledConvNet()
    cam = GradCAM(model, target_layer=model.body if use_hooks else None, method="gradcam++")
    images = torch.rand(2, 3, 8, 8)
    measured = {}  # call number -> (traced bytes left after it, its own peak above the start, live tensors)
    tracemalloc.start()
    try:
        for call in range(1, 101):
            if call in (2, 100):
                gc.collect()  # a full collection also empties the interpreter's free lists
                start = tracemalloc.get_traced_memory()[0]
                tracemalloc.reset_peak()
            cam(images, [0, 1, 2])
            assert len(model.body._forward_hooks) == 0
            if call in (2, 100):
                peak = tracemalloc.get_traced_memory()[1]
                gc.collect()
                left = tracemalloc.get_traced_memory()[0]
                measured[call] = (left, peak - start, count_live_tensors())
    finally:
        tracemalloc.stop()
    (left_2, peak_2, tensors_2), (left_100, peak_100, tensors_100) = measured[2], measured[100]
    assert tensors_100 == tensors_2, measured
    assert left_100 - left_2 < 4_000, measured  # under 40 bytes a call, where one kept tensor would be ~1 KB
    assert peak_100 < 1.1 * peak_2 + 2_000, measured


def test_class_index_table_and_user_errors(spatial_net):
    assert class_index_table(None, 2, 3, torch.device("cpu")).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert class_index_table(range(1, 3), 2, 3, torch.device("cpu")).tolist() == [[1, 2], [1, 2]]
    with pytest.raises(ValueError, match=r"\[batch=2, K\] tensor"):
        class_index_table(torch.tensor([[0], [1], [2]]), 2, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="must be integers"):
        class_index_table(torch.tensor([0.5]), 2, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"must be integers, got float64 values \[0.5, 2.0\]"):
        class_index_table([0.5, 2], 2, 3, torch.device("cpu"))
    assert class_index_table([[0, 2], [1, 1]], 2, 3, torch.device("cpu")).tolist() == [[0, 2], [1, 1]]
    with pytest.raises(ValueError, match="at least one class"):
        class_index_table([], 2, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="method must be one of"):
        GradCAM(spatial_net, method="scorecam")
    with pytest.raises(ValueError, match="needs target_layer"):
        GradCAM(nn.Sequential(nn.Conv2d(3, 2, 1)))
    with pytest.raises(ValueError, match="not a submodule"):
        GradCAM(spatial_net, target_layer=nn.Identity())
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        GradCAM(spatial_net)(torch.rand(3, 6, 6), [0])
    all_classes, _ = GradCAM(spatial_net)(torch.rand(1, 3, 6, 6), None)
    assert all_classes.shape == (1, 4, 6, 6)
