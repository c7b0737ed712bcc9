"""LayerCAM / HiResCAM analytic cases, every CAM method against pytorch-grad-cam (test oracle only), LSE pooling,
occlusion on a model that reads one known region, and clear errors for bad method / layer / patch choices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxr.errors import ConfigError
from cxr.explainer import Explainer, build_saliency, parse_methods
from cxr.gradcam import GradCAM, cam_from_gradient
from cxr.model import build_model, global_pool
from cxr.occlusion import Occlusion, patch_positions
from cxr.transforms import Preprocessing
from tests.test_gradcam import CXRNetWithFinalReLU, PooledConvNet


def test_layercam_keeps_only_positive_gradients_element_wise():
    activation = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # [1, 2, 2, 2]
    gradient = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]], [[-2.0, 2.0], [0.0, 1.0]]]])
    layercam = cam_from_gradient(activation, gradient, "layercam")[0]
    # relu(g) * A summed over channels: [[1*1 + 0, 0 + 2*1], [0.5*3 + 0, 0 + 1*1]]
    torch.testing.assert_close(layercam, torch.tensor([[1.0, 2.0], [1.5, 1.0]]))
    hirescam = cam_from_gradient(activation, gradient, "hirescam")[0]
    # relu(sum_c g * A): [[1 - 2, -2 + 2], [1.5 + 0, 0 + 1]] -> [[0, 0], [1.5, 1]]
    torch.testing.assert_close(hirescam, torch.tensor([[0.0, 0.0], [1.5, 1.0]]))


def test_hirescam_sums_to_the_score_of_a_linear_head():
    """Mean pool + linear: the gradient is w_k / (h w) everywhere, so HiResCAM's terms sum to logit - bias."""
    torch.manual_seed(4)
    model = PooledConvNet().eval()
    images = torch.rand(2, 3, 5, 7)
    activation = model.forward_features(images).detach().requires_grad_(True)
    logits = model.forward_head(activation)
    (gradient,) = torch.autograd.grad(logits[:, 1].sum(), activation)
    terms = (gradient * activation).sum(dim=1)  # before the ReLU
    torch.testing.assert_close(terms.sum(dim=(1, 2)), logits[:, 1] - model.linear.bias[1], atol=1e-6, rtol=1e-5)
    hires, _ = GradCAM(model, method="hirescam")(images, [0, 1, 2])
    gradcam, _ = GradCAM(model, method="gradcam")(images, [0, 1, 2])
    torch.testing.assert_close(hires, gradcam, atol=1e-6, rtol=1e-5)  # a constant gradient: the two coincide


def pearson(first: np.ndarray, second: np.ndarray) -> float:
    first, second = first.ravel() - first.mean(), second.ravel() - second.mean()
    return float((first * second).sum() / np.sqrt((first**2).sum() * (second**2).sum()))


class ScaledLogits(nn.Module):
    """Logits x 1000: gradients become large enough that pytorch-grad-cam's Grad-CAM++ epsilon (1e-6 added to
    a denominator of squared gradients) no longer changes its result; our formula has no epsilon."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_features(images)

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_head(feature_map) * 1000.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


@pytest.fixture(scope="module")
def oracle_setup():
    oracle_module = pytest.importorskip("pytorch_grad_cam")
    torch.manual_seed(0)
    model = ScaledLogits(CXRNetWithFinalReLU()).eval()
    images = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(5)) * 255
    return oracle_module, model, images


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "hirescam"])
@pytest.mark.parametrize("layer", ["final", "features.denseblock3"])
def test_every_cam_method_matches_pytorch_grad_cam(oracle_setup, method, layer):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    oracle_module, model, images = oracle_setup
    oracles = {"gradcam": oracle_module.GradCAM, "gradcam++": oracle_module.GradCAMPlusPlus,
               "layercam": oracle_module.LayerCAM, "hirescam": oracle_module.HiResCAM}
    target = model.inner.final_relu if layer == "final" else model.inner.features.denseblock3
    classes = [0, 13]
    ours_fast = GradCAM(model, method=method)(images, classes)[0] if layer == "final" else None
    ours, _ = GradCAM(model, target_layer=target, method=method)(images, classes)
    compared = 0
    with oracles[method](model=model, target_layers=[target]) as oracle:
        for column, finding in enumerate(classes):
            theirs = oracle(input_tensor=images, targets=[ClassifierOutputTarget(finding)])
            for image in range(1):
                mine = ours[image, column].numpy()
                if theirs[image].max() <= 0 and mine.max() <= 0:
                    continue  # both say the class has no positive evidence
                compared += 1
                assert pearson(mine, theirs[image]) > 0.99, (method, layer, finding, image)
                if ours_fast is not None:
                    np.testing.assert_allclose(ours_fast[image, column].numpy(), mine, atol=1e-5)
    assert compared >= 1


def test_lse_pooling_tends_to_avg_and_to_max():
    features = torch.randn(3, 5, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mean, peak = features.mean(dim=(2, 3)), features.amax(dim=(2, 3))
    torch.testing.assert_close(global_pool(features, "lse", 1e-6), mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(global_pool(features, "lse", 1e6), peak, atol=1e-4, rtol=0)  # max - log(24)/r <= lse <= max
    errors = [float((global_pool(features, "lse", r) - peak).abs().max()) for r in (1.0, 10.0, 100.0, 1000.0)]
    assert errors == sorted(errors, reverse=True)  # monotone in r
    assert torch.equal(global_pool(features, "max"), peak) and torch.equal(global_pool(features, "avg"), mean)


def test_pool_option_builds_and_is_used_by_the_head():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64) * 255
    avg, lse = build_model("none", pool="avg").eval(), build_model("none", pool="lse", lse_r=10.0).eval()
    lse.load_state_dict(avg.state_dict())  # same weights: the pooling is no parameter
    features = avg.forward_features(images)
    torch.testing.assert_close(lse(images), lse.head(global_pool(features, "lse", 10.0)))
    assert not torch.allclose(avg(images), lse(images))
    with pytest.raises(ConfigError, match="--pool"):
        build_model("none", pool="median")


class RegionNet(nn.Module):
    """Class 0 reads only the mean of rows 10-17, columns 20-27; class 1 reads nothing (a constant logit)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        region = images[:, 0, 10:18, 20:28].float().mean(dim=(1, 2))
        return torch.stack([(region - 100.0) / 20.0, torch.zeros_like(region)], dim=1)


def test_occlusion_finds_the_one_region_a_model_reads():
    images = torch.full((2, 1, 32, 32), 50.0)
    images[:, :, 10:18, 20:28] = 200.0
    maps, logits = Occlusion(RegionNet(), patch=4, stride=2, batch_size=7)(images)
    assert maps.shape == (2, 2, 32, 32) and torch.allclose(logits, RegionNet()(images))
    heat = maps[0, 0]
    # Only patches that overlap the region move the score: the map is zero outside the region grown by patch - 1.
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[10 - 3:18 + 3, 20 - 3:28 + 3] = False
    assert heat[outside].abs().max() == 0 and heat.max() == 1
    peak = divmod(int(heat.argmax()), 32)
    assert 10 <= peak[0] < 18 and 20 <= peak[1] < 28
    assert maps[:, 1].abs().max() == 0  # a class that reads nothing has no sensitivity anywhere
    again, _ = Occlusion(RegionNet(), patch=4, stride=2, batch_size=1000)(images, [0])
    torch.testing.assert_close(again[:, 0], maps[:, 0])  # chunking does not change the result


def test_patch_positions_cover_the_border():
    assert patch_positions(10, 4, 3) == [0, 3, 6]
    assert patch_positions(11, 4, 3) == [0, 3, 6, 7]
    assert patch_positions(4, 4, 2) == [0]


def test_bad_methods_layers_and_patches_are_config_errors():
    model = build_model("none").eval()
    preprocessing = Preprocessing(size=64)
    with pytest.raises(ConfigError, match="unknown method 'gradcam3'"):
        parse_methods("gradcam,gradcam3")
    with pytest.raises(ConfigError, match="no such module"):
        build_saliency(model, "layercam", "features.denseblock9")
    with pytest.raises(ConfigError, match="no such module"):
        Explainer(model, preprocessing, None, "layercam", 0.5, "features.nothing")
    with pytest.raises(ConfigError, match="larger than the 64 px"):
        Explainer(model, preprocessing, None, "occlusion", 0.5, None, occlusion_patch=65)
    with pytest.raises(ConfigError, match="takes no layer"):
        parse_methods("occlusion@features.denseblock2")
    assert parse_methods("layercam@features.denseblock2, gradcam", "features.denseblock3") == [
        ("layercam", "features.denseblock2"), ("gradcam", "features.denseblock3")]
