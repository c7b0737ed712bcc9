"""The network: shapes, logits out, stages for fine-tuning, and every way of loading weights."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision.models import DenseNet121_Weights, densenet121

from cxr.errors import ConfigError
from cxr.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAGES,
    ImageNetNormalization,
    WeightsUnavailableError,
    build_model,
    load_weights_file,
    stages_to_unfreeze,
)


def test_forward_returns_logits_and_exposes_features():
    torch.manual_seed(0)
    model = build_model("none", hidden=(32,)).eval()
    images = torch.rand(2, 1, 64, 64) * 255
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
    images = torch.rand(2, 1, 96, 96) * 255
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
    with pytest.raises(ConfigError, match=r"--weights .*missing.pth: no such file"):
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


def test_normalization_layer_uses_imagenet_statistics() -> None:
    images = torch.zeros(2, 1, 4, 5, dtype=torch.uint8)
    images[0, 0, 1, 2] = 255
    batch = ImageNetNormalization()(images)
    assert batch.shape == (2, 3, 4, 5) and batch.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch[0, :, 1, 2], (1 - mean) / std, rtol=0, atol=1e-6)  # one fused multiply-add
    torch.testing.assert_close(batch[1, :, 0, 0], (0 - mean) / std, rtol=0, atol=1e-6)
    assert torch.allclose(batch[0, :, 1, 2], torch.tensor([2.2489, 2.4286, 2.6400]), atol=1e-4)
    torch.testing.assert_close(ImageNetNormalization()(images.float()), batch)  # float in [0, 255] alike
    with pytest.raises(ValueError, match="expected gray images"):
        ImageNetNormalization()(torch.zeros(1, 3, 4, 4))


def test_normalization_is_inside_the_model_and_keeps_state_dicts_unchanged() -> None:
    model = build_model("none", hidden=(8,)).eval()
    assert not any("normalize" in key for key in model.state_dict())  # old checkpoints load as they are
    gray = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    seen = {}
    model.features.conv0.register_forward_hook(lambda module, args, output: seen.update(input=args[0]))
    with torch.no_grad():
        model(gray)
        torch.testing.assert_close(seen["input"], ImageNetNormalization()(gray))
        model.to(memory_format=torch.channels_last)
        model(gray)
    assert seen["input"].is_contiguous(memory_format=torch.channels_last)  # a channels_last model gets channels_last input
