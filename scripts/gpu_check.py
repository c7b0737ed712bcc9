"""A prepared GPU check: the figures a first GPU session must bring back, as JSON, each part guarded.

    python scripts/gpu_check.py --out gpu-check/                 # one GPU, at most ~8 minutes
    python scripts/gpu_check.py --out /tmp/check --device cpu --quick   # CI: the same code paths in under a minute

Parts (each writes its entry into DIR/gpu_check.json as soon as it ends; an exception is recorded, the rest runs):
  train       images/s at 224 px (bf16 autocast, channels_last), batch 32/128/256, eager and compiled, phase 1 and 2
  fp16        the same step with fp16 autocast and GradScaler (batch 128, phase 2, eager)
  evaluate    predict() images/s at the evaluation batch (256)
  gradcam     seconds for Grad-CAM of all 14 findings on one batch of 32, over several batches
  memory      peak GPU memory of one phase-2 step at 224/512/1024 px, with and without --memory-efficient
  loader      DataLoader images/s from a decoded-image cache with 4/8/14 workers
  train_py    one epoch of train.py from that cache (the projected 30-epoch time is in its output)
--quick shrinks every size (64 px, batch 2-4, 1 step) and skips compilation (minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from cxr.config import Config  # noqa: E402
from cxr.device import DevicePolicy, device_policy  # noqa: E402
from cxr.distributed import DistContext, RankZero  # noqa: E402
from cxr.engine import predict, train_one_epoch  # noqa: E402
from cxr.errors import ConfigError, run_main  # noqa: E402
from cxr.factory import build_optimizer, make_dataset, make_loader, start_epoch  # noqa: E402
from cxr.gradcam import GradCAM  # noqa: E402
from cxr.labels import NUM_CLASSES  # noqa: E402
from cxr.losses import LabelSmoothedBCE  # noqa: E402
from cxr.model import build_model, stages_to_unfreeze  # noqa: E402


class Quiet(RankZero):
    """No progress bars."""

    def progress(self, iterable, **_: Any):
        return iterable


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def batch_on(device: torch.device, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=generator)
    targets = (torch.rand(batch, NUM_CLASSES, generator=generator) > 0.8).float()
    return images.to(device), targets.to(device)


def train_rate(policy: DevicePolicy, batch: int, size: int, phase: int, compiled: bool, steps: int, warmup: int,
               memory_efficient: bool = False) -> dict[str, float]:
    """Images/s of train_one_epoch on one ready batch (and peak memory on CUDA)."""
    device = policy.device
    ctx = DistContext(0, 0, 1, device)
    model = build_model("none", memory_efficient=memory_efficient)
    model.set_trainable_stages(set() if phase == 1 else stages_to_unfreeze("2"))
    policy.prepare_model(model)
    optimizer = build_optimizer(model, Config())
    scaler = torch.amp.GradScaler(device.type, enabled=policy.uses_grad_scaler)
    wrapped = torch.compile(model) if compiled else model
    images, targets = batch_on(device, batch, size)
    loss_fn, log = LabelSmoothedBCE(0.05), Quiet(ctx, None, False)

    def run(count: int) -> None:
        train_one_epoch(wrapped, loss_fn, optimizer, [(images, targets, None)] * count, ctx, log, policy, epoch=0,
                        global_step=0, scaler=scaler, log_every=20)

    started = time.perf_counter()
    run(warmup)
    sync(device)
    warm_seconds = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    run(steps)
    sync(device)
    seconds = time.perf_counter() - started
    result = {"images_per_s": steps * batch / seconds, "warmup_seconds": warm_seconds}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return result


def part_train(args, policy) -> dict:
    results = {}
    for compiled in (False,) if args.quick else (False, True):
        for phase in (1, 2):
            for batch in args.batches:
                key = f"{'compiled' if compiled else 'eager'}_phase{phase}_batch{batch}"
                try:
                    results[key] = train_rate(policy, batch, args.size, phase, compiled, args.steps, args.warmup)
                except Exception as error:  # e.g. out of memory at 256: keep the other entries
                    results[key] = {"error": describe(error)}
                    torch.cuda.empty_cache() if policy.device.type == "cuda" else None
    if args.quick:
        results["compiled"] = "skipped (--quick)"
    return results


def part_fp16(args, policy) -> dict:
    if policy.device.type != "cuda":
        return {"skipped": "fp16 autocast with GradScaler is a CUDA path"}
    fp16 = DevicePolicy(policy.device, torch.float16, policy.channels_last)
    return train_rate(fp16, args.batches[len(args.batches) // 2], args.size, 2, False, args.steps, args.warmup)


def part_evaluate(args, policy) -> dict:
    ctx = DistContext(0, 0, 1, policy.device)
    model = policy.prepare_model(build_model("none"))
    images, targets = batch_on(policy.device, args.eval_batch, args.size)

    class Batches:
        dataset = range(args.steps * args.eval_batch)

        def __iter__(self):
            for index in range(args.steps):
                yield images, targets.cpu(), torch.arange(index * args.eval_batch, (index + 1) * args.eval_batch)

    predict(model, Batches(), ctx, policy)  # warm-up
    started = time.perf_counter()
    result = predict(model, Batches(), ctx, policy)
    return {"images_per_s": args.steps * args.eval_batch / (time.perf_counter() - started),
            "reported_images_per_s": result["images_per_s"], "batch": args.eval_batch}


def part_gradcam(args, policy) -> dict:
    model = build_model("none").to(policy.device).eval()
    cam = GradCAM(model)
    images, _ = batch_on(policy.device, args.cam_batch, args.size)
    cam(images, list(range(NUM_CLASSES)))  # warm-up
    sync(policy.device)
    times = []
    for _ in range(args.cam_rounds):
        started = time.perf_counter()
        cam(images, list(range(NUM_CLASSES)))
        sync(policy.device)
        times.append(time.perf_counter() - started)
    return {"seconds_per_batch_median": float(np.median(times)), "seconds_per_batch_min": min(times),
            "seconds_per_batch_max": max(times), "batch": args.cam_batch, "batches": args.cam_rounds}


def part_memory(args, policy) -> dict:
    results = {}
    for size in args.memory_sizes:
        for efficient in (False, True):
            key = f"{size}px_{'memory_efficient' if efficient else 'plain'}"
            try:
                results[key] = train_rate(policy, args.memory_batch, size, 2, False, 1, 1, memory_efficient=efficient)
            except Exception as error:
                results[key] = {"error": describe(error)}
            if policy.device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def make_cache(args, workdir: Path) -> tuple[Path, Path]:
    """A synthetic NIH folder and its decoded-image cache (built once, reused by `loader` and `train_py`)."""
    from cxr.cache_build import build_cache
    from cxr.synthetic import generate_synthetic_nih
    from cxr.transforms import Preprocessing

    data_dir, cache_dir = workdir / "data", workdir / "cache"
    if not cache_dir.is_dir():
        generate_synthetic_nih(data_dir, patients=args.patients, size=args.size, seed=0)
        build_cache(data_dir, cache_dir, Preprocessing(args.size), workers=max(args.loader_workers), progress=False)
    return data_dir, cache_dir


def part_loader(args, policy, workdir: Path) -> dict:
    from cxr.data import load_nih
    from cxr.transforms import Preprocessing

    data_dir, cache_dir = make_cache(args, workdir)
    ctx = DistContext(0, 0, 1, torch.device("cpu"))
    results = {}
    for workers in args.loader_workers:
        config = Config(data_dir=str(data_dir), cache_dir=str(cache_dir), image_size=args.size,
                        batch_size=args.batches[-1], workers=workers)
        data = load_nih(data_dir, split="random")
        from cxr.cache import ImageCache

        cache = ImageCache.open(cache_dir, expected=Preprocessing.from_config(config))
        loader = make_loader(make_dataset(config, data, "train", Preprocessing.from_config(config), True, cache), config, ctx, True)
        start_epoch(loader, config, ctx, 0)
        started, images = time.perf_counter(), 0
        for batch, _, _ in loader:  # from cold workers: start-up included
            images += len(batch)
        results[f"workers{workers}"] = {"images_per_s": images / (time.perf_counter() - started), "images": images}
    return results


def part_train_py(args, policy, workdir: Path) -> dict:
    data_dir, cache_dir = make_cache(args, workdir)
    command = [sys.executable, str(REPO / "train.py"), "--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
               "--out", str(workdir / "run"), "--epochs", "1", "--warmup-epochs", "0", "--image-size", str(args.size),
               "--batch-size", str(args.batches[-1]), "--workers", str(max(args.loader_workers)), "--weights", "none",
               "--device", policy.device.type, "--tensorboard", "false", "--overwrite"]
    if args.quick:
        command += ["--max-steps-per-epoch", "1", "--eval-batch-size", "4"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=args.train_timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("epoch ", "projected"))]
    return {"ok": result.returncode == 0, "returncode": result.returncode, "seconds": time.perf_counter() - started, "lines": lines,
            "stderr_tail": result.stderr[-1500:] if result.returncode else ""}


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no compilation: a CI check of the code paths")
    args = parser.parse_args(argv)
    quick = args.quick
    args.size = 64 if quick else 224
    args.batches = [2, 4] if quick else [32, 128, 256]
    args.steps, args.warmup = (1, 1) if quick else (20, 5)
    args.eval_batch, args.cam_batch, args.cam_rounds = (4, 2, 2) if quick else (256, 32, 5)
    args.memory_sizes, args.memory_batch = ([64, 96], 2) if quick else ([224, 512, 1024], 16)
    args.loader_workers = [0, 1] if quick else [4, 8, 14]
    args.patients, args.train_timeout = (6, 120) if quick else (1200, 240)
    return args


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: check(parse_args(argv)), error_status=2)


def check(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here; use --device cpu --quick")
    device = torch.device("cuda", 0) if args.device != "cpu" and torch.cuda.is_available() else torch.device("cpu")
    policy = device_policy(Config(amp="on" if device.type == "cuda" else "off", amp_dtype="bf16"), device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "torch": torch.__version__, "quick": args.quick, "policy": policy.describe(),
                              "image_size": args.size, "parts": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cxr-gpu-check-") as scratch:
        workdir = Path(scratch)
        parts: dict[str, Callable[[], dict]] = {
            "train": lambda: part_train(args, policy), "fp16": lambda: part_fp16(args, policy),
            "evaluate": lambda: part_evaluate(args, policy), "gradcam": lambda: part_gradcam(args, policy),
            "memory": lambda: part_memory(args, policy), "loader": lambda: part_loader(args, policy, workdir),
            "train_py": lambda: part_train_py(args, policy, workdir)}
        for name, part in parts.items():
            part_started = time.perf_counter()
            try:
                report["parts"][name] = {"ok": True, **part()}
            except Exception as error:  # one failure must not lose the other figures
                report["parts"][name] = {"ok": False, "error": describe(error), "traceback": traceback.format_exc()[-2000:]}
            report["parts"][name]["part_seconds"] = time.perf_counter() - part_started
            report["total_seconds"] = time.perf_counter() - started
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
            print(f"gpu_check [{report['total_seconds']:6.1f} s] {name}: {'ok' if report['parts'][name]['ok'] else 'FAILED'}",
                  flush=True)
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if all(part["ok"] for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
