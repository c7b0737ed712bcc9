"""Cascading randomization (Adebayo et al. 2018): SSIM / Spearman, the edge-detector trap, a trained model passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cxr.sanity import CASCADE, EDGE, edge_maps, randomized, sanity_check, spearman, ssim


class TinyNet(nn.Module):
    """Two convolutions, mean pooling and a linear head, with CXRNet's stage_modules/head interface."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def stage_modules(self, stage: str) -> list[nn.Module]:
        return {"block4": [self.features[2]], "block3": [self.features[0]]}.get(stage, [])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images.float() / 255.0)

    def forward_head(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.head(feature_map.mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def blob_images(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """32 px images: class 0 = a bright disc somewhere, class 1 = a dark one; textured background."""
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    images = 60 + 20 * torch.rand(count, 1, 32, 32, generator=generator)
    labels = torch.zeros(count, 2)
    for index in range(count):
        y, x = (4 + 24 * torch.rand(2, generator=generator)).tolist()
        disc = ((rows - y) ** 2 + (cols - x) ** 2) < 9
        bright = index % 2 == 0
        images[index, 0][disc] = 220.0 if bright else 10.0
        labels[index, 0 if bright else 1] = 1.0
    return images, labels


@pytest.fixture(scope="module")
def trained_tiny() -> tuple[TinyNet, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        images, labels = blob_images(16, generator)
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, labels = blob_images(8, generator)
    assert ((model(images) > 0).float() == labels).float().mean() > 0.9  # it learned the task
    return model.eval(), images


def test_ssim_and_spearman_basics():
    rng = np.random.default_rng(0)
    image = rng.random((32, 32))
    assert ssim(image, image) == pytest.approx(1.0) and spearman(image, image) == pytest.approx(1.0)
    assert spearman(image, 2 * image + 3) == pytest.approx(1.0) and spearman(image, -image) == pytest.approx(-1.0)
    assert ssim(image, rng.random((32, 32))) < 0.2 and abs(spearman(image, rng.random((32, 32)))) < 0.2
    assert spearman(image, np.zeros((32, 32))) == 0.0  # a constant map has no ranking
    assert ssim(image, image * 0.5) < ssim(image, image * 0.9) < 1.0


def test_randomized_resets_only_the_cascade_and_leaves_the_model_alone(trained_tiny):
    model, _ = trained_tiny
    before = {name: value.clone() for name, value in model.state_dict().items()}
    head_only = randomized(model, ("head",))
    assert not torch.equal(head_only.head.weight, model.head.weight)
    assert torch.equal(head_only.features[0].weight, model.features[0].weight)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_sanity_check_flags_the_edge_detector_and_passes_a_trained_model(trained_tiny, tmp_path):
    model, images = trained_tiny
    report = sanity_check(model, images, ["gradcam", "hirescam", "occlusion"], tmp_path, occlusion=(6, 3), figures=1)
    assert report["stages"] == ["trained"] + ["+".join(CASCADE[:depth]) for depth in range(1, len(CASCADE) + 1)]
    edge = report["methods"][EDGE]["stages"]
    assert all(stage["spearman"] == pytest.approx(1.0) and stage["ssim"] == pytest.approx(1.0) for stage in edge)
    assert EDGE in report["flagged"]
    for method in ("gradcam", "hirescam", "occlusion"):
        assert not report["methods"][method]["flagged"], (method, report["methods"][method])
        assert report["methods"][method]["stages"][-1]["spearman"] < 0.5
    saved = json.loads((tmp_path / "sanity.json").read_text())
    assert saved["flagged"] == report["flagged"] and (tmp_path / "sanity_0.png").stat().st_size > 1000


def test_edge_maps_follow_the_input():
    images = torch.zeros(1, 1, 16, 16)
    images[..., 4:12, 4:12] = 255
    edges = edge_maps(images)[0]
    assert edges.max() == 1.0 and edges[8, 8] == 0 and edges[0, 0] == 0 and edges[4, 8] > 0.5
