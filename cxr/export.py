"""Export a trained model for serving without this codebase: ONNX, TorchScript, torch.export (.pt2), safetensors.

    report = export_model("runs/X/best.pt", "onnx", "deploy/")      # verified on real images, else ExportError
    print(report["max_abs_diff"])                                    # probabilities vs the PyTorch model
    model, config = load_safetensors("deploy/model.safetensors")     # back into a CXRNet (needs cxr)

The exported graph takes float32 gray images [B, 1, S, S] with values in [0, 255] at the training size S, any
batch size (uint8 images: cast to float32, exactly) and returns (probabilities, logits), each [B, 14] in
Wang et al. order. Normalization and the gray-to-3-channel repeat are inside: they are the model's first layer
(cxr.model.ImageNetNormalization). CLAHE/equalization stays outside (OpenCV): the folder holds
preprocessing.json (Preprocessing.as_dict()), preprocess.py (a numpy + OpenCV reference, cxr/export_reference.py)
and model.json (inputs, outputs, classes, verification). A file is renamed into place only after the exported
model reproduced the PyTorch probabilities on real images within `tolerance`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxr.errors import CxrError
from cxr.labels import FINDINGS
from cxr.transforms import Preprocessing

FORMATS: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported": "model.pt2",
                           "safetensors": "model.safetensors"}
NEEDS: dict[str, tuple[str, ...]] = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "safetensors": ("safetensors",)}
TOLERANCE = 1e-4
VERIFY_COUNT = 8
SAFETENSORS_FORMAT = "cxr-safetensors-1"


class ExportError(CxrError):
    """An export that could not be written or did not reproduce the PyTorch model; the message says which."""


class DeployModel(nn.Module):
    """The served graph: gray [B, 1, S, S] in [0, 255] -> (sigmoid probabilities, logits), both [B, 14] float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images).float()
        return torch.sigmoid(logits), logits


def require_extra(fmt: str) -> None:
    """Import what `fmt` needs, or say which extra to install."""
    for module in NEEDS.get(fmt, ()):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ExportError(f"--format {fmt} needs {', '.join(NEEDS[fmt])} ({module} is missing): "
                              "pip install 'cxr[export]'") from error


def write_format(fmt: str, deploy: DeployModel, example: torch.Tensor, path: Path, checkpoint: dict) -> None:
    """Serialize `deploy` in `fmt` to `path` (batch dimension dynamic)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter chatter about the shape check in the first layer
        if fmt == "onnx":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(deploy, (example,), dynamo=True, input_names=["images"],
                                        output_names=["probabilities", "logits"], dynamic_shapes={"images": {0: batch}},
                                        verbose=False)
            program.save(str(path), external_data=False)
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(deploy, (example,), check_trace=False), str(path))
        elif fmt == "exported":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.export.save(torch.export.export(deploy, (example,), dynamic_shapes={"images": {0: batch}}), str(path))
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            state = {name: tensor.contiguous() for name, tensor in deploy.model.state_dict().items()}
            save_file(state, str(path), metadata=safetensors_metadata(checkpoint))
        else:
            raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")


def safetensors_metadata(checkpoint: dict) -> dict[str, str]:
    """String metadata: the run's config, preprocessing, classes and schema, so the weights need no pickle."""
    return {"format": SAFETENSORS_FORMAT, "schema_version": str(checkpoint.get("schema_version")),
            "config": json.dumps(checkpoint["config"]), "class_names": json.dumps(list(FINDINGS)),
            "preprocessing": json.dumps(Preprocessing.from_checkpoint(checkpoint).as_dict()),
            "epoch": str(checkpoint.get("epoch")), "best_metric": str(checkpoint.get("best_metric"))}


def load_safetensors(path: str | Path) -> tuple[nn.Module, dict]:
    """A CXRNet (eval, CPU) and the run's config dict from a model.safetensors written here."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from cxr.config import Config
    from cxr.factory import model_for_config

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise ExportError(f"{path}: not a cxr safetensors export (format {metadata.get('format')!r})")
    config = Config.from_dict(json.loads(metadata["config"]))
    model = model_for_config(config)  # pooling and output stride too: an lse-pooled model must load as lse
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as error:
        raise ExportError(f"{path}: its weights do not fit the model its config describes ({error})") from error
    return model.eval(), json.loads(metadata["config"])


def checkpoint_from_safetensors(path: str | Path) -> tuple[nn.Module, dict]:
    """A CXRNet and a checkpoint-like dict (config, class names, schema, epoch) from a model.safetensors export,
    so that everything that takes a checkpoint (Classifier, the preprocessing) takes the sharing format too."""
    from safetensors import safe_open

    model, config = load_safetensors(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return model, {"config": config, "class_names": json.loads(metadata["class_names"]),
                   "schema_version": metadata.get("schema_version"), "epoch": metadata.get("epoch"),
                   "best_metric": metadata.get("best_metric"), "source": str(path)}


def runner(fmt: str, path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Load a written export the way a deployment would; returns images -> (probabilities, logits)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: tuple(session.run(["probabilities", "logits"], {"images": images}))
    if fmt == "safetensors":
        module = DeployModel(load_safetensors(path)[0])
    elif fmt == "torchscript":
        module = torch.jit.load(str(path))
    else:
        module = torch.export.load(str(path)).module()

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            probabilities, logits = module(torch.from_numpy(images))
        return probabilities.numpy(), logits.numpy()

    return run


def verification_batch(paths: Sequence[str | Path], preprocessing: Preprocessing, count: int = VERIFY_COUNT) -> tuple[np.ndarray, list[str]]:
    """float32 [N, 1, S, S] of the first `count` readable images among files/folders `paths`, and their names."""
    from cxr.predict import decode, resolve_inputs

    images, names = [], []
    for name, source in resolve_inputs(list(paths)):
        try:
            images.append(preprocessing(decode(name, source)))
        except CxrError:
            continue
        names.append(name)
        if len(images) == count:
            break
    if not images:
        raise ExportError(f"no readable image to verify the export with in {', '.join(map(str, paths))}")
    return np.stack(images)[:, None].astype(np.float32), names


def compare(fmt: str, path: Path, deploy: DeployModel, batch: np.ndarray) -> dict[str, float]:
    """Max |difference| of probabilities and logits, exported vs PyTorch, for the batch and for its first image alone."""
    with torch.no_grad():
        expected = [value.numpy() for value in deploy(torch.from_numpy(batch))]
    run = runner(fmt, path)
    whole, single = run(batch), run(batch[:1])  # a second batch size: the batch dimension is dynamic
    return {"max_abs_diff": float(max(np.abs(whole[0] - expected[0]).max(), np.abs(single[0] - expected[0][:1]).max())),
            "max_abs_diff_logits": float(max(np.abs(whole[1] - expected[1]).max(), np.abs(single[1] - expected[1][:1]).max()))}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_model(checkpoint_path: str | Path, fmt: str, out: str | Path, verify_images: Sequence[str | Path],
                 tolerance: float = TOLERANCE, verify_count: int = VERIFY_COUNT) -> dict:
    """Write OUT/<model file>, preprocessing.json, preprocess.py and model.json; verified before it is renamed in."""
    from cxr.factory import load_trained_model

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_extra(fmt)
    model, _, checkpoint = load_trained_model(checkpoint_path, torch.device("cpu"))  # fp32, contiguous, eval
    preprocessing = Preprocessing.from_checkpoint(checkpoint)
    batch, names = verification_batch(verify_images, preprocessing, verify_count)
    deploy = DeployModel(model).eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / FORMATS[fmt]
    partial = out / f".partial-{os.getpid()}-{target.name}"
    try:
        example = torch.from_numpy(np.concatenate([batch, batch])[:2])  # batch 2: 1 would fix the dimension
        write_format(fmt, deploy, example, partial, checkpoint)
        differences = compare(fmt, partial, deploy, batch)
        if not differences["max_abs_diff"] <= tolerance:
            raise ExportError(f"{fmt} export does not reproduce the PyTorch model: max |probability difference| "
                              f"{differences['max_abs_diff']:.3g} > {tolerance:g} on {len(names)} image(s); nothing written")
        os.chmod(partial, 0o666 & ~_umask())  # some writers make private files; an export is meant to be shared
        os.replace(partial, target)
    except ExportError:
        raise
    except Exception as error:  # exporters raise many types; the user needs the format and the reason
        raise ExportError(f"{fmt} export failed ({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''})") from error
    finally:
        partial.unlink(missing_ok=True)
    (out / "preprocessing.json").write_text(json.dumps(preprocessing.as_dict(), indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("export_reference.py"), out / "preprocess.py")
    report = {"format": fmt, "file": target.name, "checkpoint": str(checkpoint_path), "epoch": checkpoint.get("epoch"),
              "input": {"name": "images", "shape": ["batch", 1, preprocessing.size, preprocessing.size],
                        "dtype": "float32", "range": [0, 255]},
              "outputs": ["probabilities", "logits"], "classes": list(FINDINGS),
              "verified_on": names, "tolerance": tolerance, **differences}
    meta = out / "model.json"
    entries = json.loads(meta.read_text()) if meta.is_file() else {}
    entries[fmt] = report
    meta.write_text(json.dumps(entries, indent=2) + "\n")
    return report
