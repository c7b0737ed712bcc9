"""The network: shapes, logits out, stages for fine-tuning, and every way of loading weights."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision.models import DenseNet121_Weights, densenet121

from cxr.model import STAGES, WeightsUnavailableError, build_model, load_weights_file, stages_to_unfreeze


def test_forward_returns_logits_and_exposes_features():
    torch.manual_seed(0)
    model = build_model("none", hidden=(32,)).eval()
    images = torch.randn(2, 3, 64, 64)
    features = model.forward_features(images)
    assert features.shape == (2, 1024, 2, 2) and (features >= 0).all()
    logits = model(images)
    assert logits.shape == (2, 14)
    assert torch.equal(logits, model.forward_head(features))
    assert (logits < 0).any()  # raw logits, no sigmoid inside the model
    head_layers = [type(layer).__name__ for layer in model.head]
    assert head_layers == ["BatchNorm1d", "Linear", "ReLU", "Dropout", "Linear"]


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_trunk_is_the_standard_one_sampled_finer(output_stride):
    torch.manual_seed(0)
    standard = build_model("none").eval()
    dilated = build_model("none", output_stride=output_stride).eval()
    dilated.load_state_dict(standard.state_dict())  # same parameters: dilation changes no weight
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        coarse, fine = standard.forward_features(images), dilated.forward_features(images)
    step = 32 // output_stride
    assert coarse.shape == (2, 1024, 3, 3) and fine.shape == (2, 1024, 3 * step, 3 * step)
    # "A trous": every step-th position of the finer map is the stride-32 network's map, borders included.
    torch.testing.assert_close(fine[..., ::step, ::step], coarse, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fine[..., 1::step, 1::step], coarse, atol=1e-2)  # the new positions are new


def test_output_stride_must_be_supported():
    with pytest.raises(ValueError, match=r"--output-stride must be one of \[8, 16, 32\], got 4"):
        build_model("none", output_stride=4)


def test_unfreeze_choices():
    assert stages_to_unfreeze("0") == set()
    assert stages_to_unfreeze(1) == {"block4"}
    assert stages_to_unfreeze("3") == {"block2", "block3", "block4"}
    assert stages_to_unfreeze("all") == set(STAGES)
    with pytest.raises(ValueError, match="--unfreeze must be 0..4 or 'all'"):
        stages_to_unfreeze("5")


def test_torchvision_state_dict_with_old_key_names_loads_into_the_trunk(tmp_path):
    reference = densenet121()
    state = reference.state_dict()
    # The published file predates torchvision's renaming: 'norm1' was 'norm.1', 'conv2' was 'conv.2'.
    old_style = {key.replace("norm1", "norm.1").replace("conv2", "conv.2") if "denselayer" in key else key: value
                 for key, value in state.items()}
    assert any("norm.1" in key for key in old_style)
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(old_style, path)
    model = build_model(str(path))
    for key, value in reference.features.state_dict().items():
        assert torch.equal(model.features.state_dict()[key], value), key


def test_our_checkpoint_loads_as_weights(tmp_path):
    source = build_model("none", hidden=(32,))
    path = tmp_path / "best.pt"
    torch.save({"model": source.state_dict(), "config": {}}, path)
    target = build_model("none", hidden=(32,))
    assert load_weights_file(target, path) == "checkpoint"
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


def test_bad_weight_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--weights .*missing.pth: no such file"):
        build_model(str(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ValueError, match=r"holds no DenseNet 'features.\*' weights"):
        build_model(str(other))


def test_offline_imagenet_download_says_how_to_pass_a_file(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(type(DenseNet121_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match=r"--weights /path/to/densenet121-a639ec97.pth"):
        build_model("imagenet")
