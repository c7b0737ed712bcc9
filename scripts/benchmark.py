"""Measure our code against the bare limits on this machine: seven ratios with goals, a table and a JSON file.

    python scripts/benchmark.py                                        # CPU or GPU, synthetic NIH-format images
    python scripts/benchmark.py --device cuda --data-dir /data/nih --json bench.json
    python scripts/benchmark.py --device cpu --image-size 64 --batch-size 2 --steps 1 --rounds 1 \
        --epoch-images 4 --highres-size 0                                 # smoke run

Each pair runs the same files or the same batch, interleaved in every round, warm-up excluded; a ratio is taken
per round and reported as its median over the rounds, with its spread (half the range over the rounds, relative to
the median) beside it, so one round disturbed by another process neither makes nor breaks a figure:
  png_pipeline_vs_decode  ChestXrayDataset[i] from PNG (decode, resize, CLAHE, augment, tensor) vs bare
                          cv2.imdecode of the same files; images/s on one thread            goal >= 0.85
  cache_vs_png_pipeline   the same dataset served by the decoded-image cache vs from PNG      goal >= 10
  train_step_vs_bare      train_one_epoch (CXRNet, LabelSmoothedBCE, DevicePolicy, our Adam groups,
                          per-step seeding, every stage trainable) vs torchvision densenet121 + BCE + Adam
                          (the phase-1 and phase-2 steps of the recipe are timed beside it)  goal >= 0.98
  eval_vs_bare_forward    predict() on ready uint8 batches vs a no_grad forward of the model  goal >= 0.9
  gradcam14_vs_forward    GradCAM of all 14 classes vs one no_grad forward, over --steps batches
                          (time, lower wins)                                                  goal <= 2.0
  data_wait_fraction      a fresh make_loader (trainer settings, persistent workers started cold, the cache
                          of --epoch-images distinct images) feeding the phase-1 step for one whole epoch:
                          share of the epoch spent waiting for batches, worker start-up included
                          (phase 1 asks for data fastest)                                     goal < 0.02 on GPU
  predict_files_vs_bare_forward  scripts/predict.py's path (Classifier over the PNG files, decoding in --workers
                          processes) vs a no_grad forward of as many ready images             goal >= 0.9
It also times the full evaluation report on NIH-sized predictions (25,596 test images x 14 findings, 2,797
patients; 8,600 validation images; 77,900 training rows for the metadata baseline), on one core: calibration,
thresholds, 1,000 patient-bootstrap resamples, subgroups (sex, age, view) with their own bootstraps, the metadata
baseline, and a paired comparison (DeLong + 1,000 paired resamples). Goal: under 10 s. `--only evaluation-report`
runs just that (seconds, no images or model).
High resolution: a fresh process per setting trains a few full-trunk steps at --highres-size (512) with and
without --memory-efficient and reports step seconds and peak memory (CPU: peak RSS of that process; CUDA: peak
allocated GPU memory as well).
On CUDA it also reports gpu_train_images_per_s (that end-to-end run; aim >= 3,500 on one H100/H200 at 224 px
with AMP and channels_last) and peak_gpu_memory_gb. Without --data-dir a synthetic set is generated with enough
images for --epoch-images (4,096 at 224 px on CUDA: the page cache alone cannot hold the measurement up).
Every explanation method's cost for 14 classes relative to one forward is reported too (explain_*14_vs_forward).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.models import densenet121  # noqa: E402

from cxr.audit import evaluation_report  # noqa: E402
from cxr.cache import ImageCache  # noqa: E402
from cxr.cache_build import build_cache  # noqa: E402
from cxr.compare import compare_predictions  # noqa: E402
from cxr.config import Config  # noqa: E402
from cxr.data import ChestXrayDataset, DataError, NihData, find_table, load_nih, locate_images, read_nih_table, table_to_index  # noqa: E402
from cxr.device import DevicePolicy, configure_cuda, device_policy  # noqa: E402
from cxr.distributed import DistContext, RankZero  # noqa: E402
from cxr.engine import predict, train_one_epoch  # noqa: E402
from cxr.errors import ConfigError, run_main  # noqa: E402
from cxr.factory import build_optimizer, build_scheduler, make_dataset, make_loader, model_for_config, start_epoch  # noqa: E402
from cxr.gradcam import GradCAM  # noqa: E402
from cxr.labels import FINDINGS, NUM_CLASSES  # noqa: E402
from cxr.losses import LabelSmoothedBCE  # noqa: E402
from cxr.model import CXRNet, ImageNetNormalization, stages_to_unfreeze  # noqa: E402
from cxr.subgroups import age_groups, sex_groups, view_groups  # noqa: E402
from cxr.synthetic import generate_synthetic_nih, plan_dataset  # noqa: E402
from cxr.transforms import Preprocessing  # noqa: E402

GOALS: dict[str, tuple[str, float]] = {
    "png_pipeline_vs_decode": (">=", 0.85), "cache_vs_png_pipeline": (">=", 10.0), "train_step_vs_bare": (">=", 0.98),
    "eval_vs_bare_forward": (">=", 0.9), "gradcam14_vs_forward": ("<=", 2.0), "data_wait_fraction": ("<", 0.02),
    "predict_files_vs_bare_forward": (">=", 0.9),
}
PREDICT_FILES_PASSES = 4  # predict.py's path reads this many times --steps batches per round: worker start-up
#                           amortizes as it does over a real folder, and one slow start does not swing the ratio
GPU_TRAIN_AIM = 3500.0  # images/s, DenseNet121 at 224 px from the cache on one H100/H200
EVALUATION_REPORT_GOAL_SECONDS = 10.0  # on one core, for the NIH test split
NIH_PREVALENCE = (0.103, 0.025, 0.119, 0.177, 0.052, 0.056, 0.013, 0.047, 0.042, 0.021, 0.022, 0.015, 0.03, 0.002)
MIN_PASS_SECONDS = 0.5  # per-core image benchmarks: each timed pass over the files lasts at least this long


class _QuietLog(RankZero):
    """The trainer's logger without progress bars, so that timings and the table stay clean."""

    def progress(self, iterable, **_: Any):
        return iterable


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Flags; sizes left unset get device-dependent defaults in `resolve_defaults`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    parser.add_argument("--data-dir", default="", help="NIH folder (only images on disk are used); default: synthetic")
    parser.add_argument("--json", default="", help="write the report here as JSON")
    parser.add_argument("--image-size", type=int, help="network input size (default 224 on CUDA, 128 on CPU)")
    parser.add_argument("--batch-size", type=int, help="images per step (default 128 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default 30 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--workers", type=int, help="DataLoader workers and cache builders (default min(8, cores-1) "
                        "on CUDA, min(2, cores) on CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds per pair; the median counts")
    parser.add_argument("--max-images", type=int, default=64, help="files used by the per-core image benchmarks")
    parser.add_argument("--epoch-images", type=int, help="distinct cached images in the data-wait epoch (default "
                        "4096 on CUDA, 128 on CPU); fewer on disk are repeated")
    parser.add_argument("--highres-size", type=int, default=512, help="input size of the memory-efficient comparison "
                        "(0: skip it)")
    parser.add_argument("--highres-batch", type=int, help="its batch (default 32 on CUDA, 4 on CPU)")
    parser.add_argument("--highres-child", help=argparse.SUPPRESS)  # SIZE,BATCH,STEPS,EFFICIENT,DEVICE: one setting
    parser.add_argument("--only", choices=("evaluation-report",), help="run only this measurement")
    parser.add_argument("--synthetic-patients", type=int, default=40, help="patients generated (no --data-dir)")
    parser.add_argument("--synthetic-size", type=int, default=1024,
                        help="generated image size (no --data-dir); 1024, NIH's own, so a file costs what a real one does")
    return parser.parse_args(argv)


def resolve_defaults(args: argparse.Namespace, cuda: bool, cpus: int) -> argparse.Namespace:
    """Fill unset sizes for the device and reject values no benchmark can run with, naming the flag."""
    defaults = {"image_size": (224, 128), "batch_size": (128, 8), "steps": (30, 3), "warmup": (5, 1),
                "workers": (min(8, max(1, cpus - 1)), min(2, cpus)), "epoch_images": (4096, 128),
                "highres_batch": (32, 4)}
    for name, (on_gpu, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if cuda else on_cpu)
    minimums = {"image_size": 32, "batch_size": 2, "steps": 1, "warmup": 1, "workers": 0, "max_images": 1, "rounds": 1,
                "epoch_images": 2, "highres_size": 0, "highres_batch": 2}
    problems = [f"--{name.replace('_', '-')} must be at least {low}" for name, low in minimums.items()
                if getattr(args, name) < low]
    if problems:
        raise ConfigError("; ".join(problems) + " (batch 2: the head's BatchNorm needs two images)")
    return args


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_files(args: argparse.Namespace, workdir: Path) -> tuple[Path, int]:
    """A folder with a table and links to the first max(--max-images, --epoch-images) images on disk; returns it
    and the source image size. Synthetic data gets enough patients for that many images."""
    wanted = max(args.max_images, args.epoch_images)
    source = Path(args.data_dir) if args.data_dir else workdir / "synthetic"
    if not args.data_dir:
        patients = args.synthetic_patients
        while len(plan_dataset(patients, seed=0)) < wanted:  # about 3 images per patient
            patients = math.ceil(patients * 1.5)
        generate_synthetic_nih(source, patients=patients, size=args.synthetic_size, seed=0,
                               workers=max(1, min(args.workers, patients // 200)))
    table_path = find_table(source)
    table = read_nih_table(table_path)
    index = locate_images(table_to_index(table, str(table_path)), source)
    present = np.flatnonzero(index.image_dir_ids >= 0)[:wanted]
    if len(present) < 2:
        raise DataError(f"--data-dir {source}: {len(present)} image(s) of {table_path.name} on disk; "
                        "the benchmark needs 2")
    subset = workdir / "files"
    (subset / "images").mkdir(parents=True)
    table.iloc[present].to_csv(subset / "Data_Entry_2017.csv", index=False)
    for row in present:
        target, link = Path(index.image_path(row)).resolve(), subset / "images" / index.image_names[row]
        try:
            os.symlink(target, link)
        except OSError:  # no symlinks on this file system
            link.write_bytes(target.read_bytes())
    first = cv2.imdecode(np.fromfile(index.image_path(present[0]), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    return subset, int(first.shape[0])


def round_rates(passes: dict[str, Callable[[int], Any]], count: int, rounds: int) -> dict[str, list[float]]:
    """Items/s of each pass over items 0..count-1, one value per round; rounds interleave the passes so that a
    change of load hits all of them alike."""
    for run_one in passes.values():  # untimed: page cache, CLAHE objects, albumentations set-up
        for item in range(count):
            run_one(item)
    rates: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(rounds):
        for name, run_one in passes.items():
            done, start = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - start < MIN_PASS_SECONDS:
                for item in range(count):
                    run_one(item)
                done += count
            rates[name].append(done / (time.perf_counter() - start))
    return rates


def median(values: list[float]) -> float:
    return float(np.median(values))


def per_round(top: list[float], bottom: list[float]) -> list[float]:
    """The ratio of two interleaved measurements, round by round."""
    return [a / b for a, b in zip(top, bottom, strict=True)]


def spread(values: list[float]) -> float:
    """Half the range of the rounds relative to their median: 0.05 means every round lies within about +-5%."""
    middle = median(values)
    return (max(values) - min(values)) / 2 / abs(middle) if middle else math.inf


def bare_train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     inputs: torch.Tensor, targets: torch.Tensor, amp_dtype: torch.dtype | None, steps: int) -> None:
    """The textbook step: autocast forward, BCE-with-logits, backward, Adam."""
    model.train()
    for _ in range(steps):
        with torch.autocast(inputs.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(inputs)
        loss = F.binary_cross_entropy_with_logits(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


class ReadyBatches:
    """A stand-in for an evaluation DataLoader: one ready uint8 batch, served `count` times as new samples."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, count: int):
        self.images, self.targets, self.count = images, targets, count
        self.dataset = range(count * len(images))  # predict() only needs its length

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        size = len(self.images)
        for batch in range(self.count):
            yield self.images, self.targets, torch.arange(batch * size, (batch + 1) * size)


class WaitTimer:
    """Wraps a DataLoader and records, per batch, when it was asked for and how long it took to arrive."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader, self.dataset = loader, loader.dataset
        self.requested: list[float] = []
        self.waits: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            asked = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.requested.append(asked)
            self.waits.append(time.perf_counter() - asked)
            yield batch


def round_seconds(device: torch.device, works: dict[str, Callable[[int], Any]], warmup: int, steps: int,
                  rounds: int) -> dict[str, list[float]]:
    """Seconds of `work(steps)` per work and round, after an untimed `work(warmup)`; rounds interleave the works."""
    def timed(work: Callable[[int], Any], count: int) -> float:
        synchronize(device)  # queued GPU work belongs to whoever queued it
        start = time.perf_counter()
        work(count)
        synchronize(device)
        return time.perf_counter() - start

    for work in works.values():
        timed(work, warmup)
    seconds: dict[str, list[float]] = {name: [] for name in works}
    for _ in range(rounds):
        for name, work in works.items():
            seconds[name].append(timed(work, steps))
    return seconds


@dataclasses.dataclass
class Bench:
    """What the measurements share: device settings, the benchmark files (PNG and cached) and one batch."""

    args: argparse.Namespace
    ctx: DistContext
    config: Config
    policy: DevicePolicy
    data: NihData
    cache: ImageCache
    images: torch.Tensor  # uint8 [B, 1, S, S], pinned on CUDA, as a loader hands it over
    targets: torch.Tensor
    inputs: torch.Tensor  # the same batch on the device: what our model takes (it normalizes itself)
    bare_inputs: torch.Tensor  # the batch ImageNet-normalized to 3 channels: what the bare torchvision model gets
    preprocessing: Preprocessing

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def dataset(self, rows: np.ndarray, cached: bool) -> ChestXrayDataset:
        """The trainer's augmented training dataset over `rows` of the benchmark files."""
        return training_dataset(self.config, self.preprocessing, self.data, rows, self.cache if cached else None)


def training_dataset(config: Config, preprocessing: Preprocessing, data: NihData, rows: np.ndarray,
                     cache: ImageCache | None) -> ChestXrayDataset:
    """make_dataset's training dataset (with augmentation) over index rows of our choice; rows may repeat."""
    return make_dataset(config, dataclasses.replace(data, splits={"train": rows}), "train", preprocessing, train=True,
                        cache=cache)


def set_up(args: argparse.Namespace, device: torch.device, workdir: Path, figures: dict) -> Bench:
    """Benchmark files, their cache (built untimed), the trainer's config and policy, and one cached batch."""
    files_dir, figures["source_image_px"] = prepare_files(args, workdir)
    config = Config(data_dir=str(files_dir), cache_dir=str(workdir / "cache"), skip_missing=True, split="random",
                    image_size=args.image_size, batch_size=args.batch_size, workers=args.workers, device=device.type,
                    unfreeze="all", weights="none")
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    policy = device_policy(config, device)
    preprocessing = Preprocessing.from_config(config)
    data = load_nih(files_dir, skip_missing=True, split="random")
    started = time.perf_counter()  # worker processes start in seconds (forkserver): only worth it for many files
    build_cache(files_dir, config.cache_dir, preprocessing,
                workers=max(1, min(args.workers, len(data.index) // 500)), skip_missing=True, progress=False)
    figures["cache_build_seconds"] = time.perf_counter() - started
    figures["benchmark_files"] = len(data.index)
    cache = ImageCache.open(config.cache_dir, expected=preprocessing)
    batch_set = training_dataset(config, preprocessing, data, np.resize(np.arange(len(data.index)), args.batch_size), cache)
    batch_set.reseed(0)
    images, targets, _ = next(iter(torch.utils.data.DataLoader(batch_set, batch_size=args.batch_size)))
    if device.type == "cuda":
        images, targets = images.pin_memory(), targets.pin_memory()
    inputs = policy.inputs(images)
    bare_inputs = ImageNetNormalization().to(device)(inputs).contiguous(memory_format=policy.memory_format)
    return Bench(args, ctx, config, policy, data, cache, images, targets, inputs, bare_inputs, preprocessing)


def measure_image_pipelines(bench: Bench) -> dict[str, list[float]]:
    """Images/s on one thread, per round: bare cv2 decode, our PNG pipeline and our cached pipeline, same files."""
    rows = np.arange(min(len(bench.data.index), bench.args.max_images))
    paths = [bench.data.index.image_path(row) for row in rows]
    png_set, cached_set = bench.dataset(rows, cached=False), bench.dataset(rows, cached=True)
    png_set.reseed(0)
    cached_set.reseed(0)
    cv2_threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        passes = {"decode": lambda i: cv2.imdecode(np.fromfile(paths[i], dtype=np.uint8), cv2.IMREAD_UNCHANGED),
                  "png_pipeline": png_set.__getitem__, "cache_pipeline": cached_set.__getitem__}
        return round_rates(passes, len(paths), bench.args.rounds)
    finally:
        cv2.setNumThreads(cv2_threads)  # the DataLoader workers later run with the trainer's own settings


class OurStep:
    """train_one_epoch called the way train.py calls it (optimizer groups, scheduler, scaler, per-step seeding),
    on one model whose phase can be switched between timings."""

    def __init__(self, model: CXRNet, config: Config, ctx: DistContext, policy: DevicePolicy, steps_per_epoch: int):
        self.model, self.config, self.ctx, self.policy = model, config, ctx, policy
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch=steps_per_epoch)
        self.loss_fn = LabelSmoothedBCE(config.label_smoothing).to(ctx.device)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=policy.uses_grad_scaler)
        self.log = _QuietLog(ctx, None, False)

    def phase(self, phase: int | str) -> None:
        """1: trunk frozen; 2: the recipe's --unfreeze; "all": every stage (the bare step's work)."""
        self.model.set_trainable_stages(stages_to_unfreeze("all") if phase == "all" else
                                        configure_phase_stages(phase, self.config))
        self.optimizer.zero_grad(set_to_none=True)  # no stale gradient on a frozen stage reaches Adam

    def __call__(self, loader: Any, count: int) -> dict:
        return train_one_epoch(self.model, self.loss_fn, self.optimizer, loader, self.ctx, self.log, self.policy,
                               epoch=0, global_step=0, scaler=self.scaler, step_scheduler=self.scheduler.step,
                               max_steps=count, log_every=self.config.log_every, grad_clip=self.config.grad_clip,
                               seed=self.config.seed)


def configure_phase_stages(phase: int, config: Config) -> set[str]:
    """The trunk stages train.py trains in `phase` (factory.configure_phase without touching a model)."""
    return set() if phase == 1 else stages_to_unfreeze(config.unfreeze)


def measure_training(bench: Bench, step: OurStep) -> dict[str, list[float]]:
    """Seconds for --steps steps, per round: our step with every stage trainable vs the bare torchvision step on
    the same batch, and our phase-1 (trunk frozen) and phase-2 (--unfreeze) steps in the same rounds."""
    memory_format = torch.channels_last if bench.policy.channels_last else torch.contiguous_format
    bare = densenet121(num_classes=NUM_CLASSES).to(bench.device, memory_format=memory_format)
    optimizer = torch.optim.Adam(bare.parameters(), lr=bench.config.lr)
    scaler = torch.amp.GradScaler(bench.device.type, enabled=bench.policy.uses_grad_scaler)
    targets = bench.targets.to(bench.device)

    def bare_steps(count: int) -> None:
        bare_train_steps(bare, optimizer, scaler, bench.bare_inputs, targets, bench.policy.amp_dtype, count)

    def ours(phase: int | str) -> Callable[[int], Any]:
        def work(count: int) -> None:
            step.phase(phase)
            step([(bench.images, bench.targets, None)] * count, count)
        return work

    seconds = round_seconds(bench.device, {"ours": ours("all"), "bare": bare_steps, "phase1": ours(1),
                                           "phase2": ours(2)}, bench.args.warmup, bench.args.steps, bench.args.rounds)
    step.phase("all")
    return seconds


def measure_inference(bench: Bench, model: CXRNet) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round: predict() vs a bare no_grad forward (--steps batches), and Grad-CAM of 14 classes vs one forward
    (also over --steps batches: one Grad-CAM call is too short a timing to trust)."""
    def our_predict(count: int) -> None:
        predict(model, ReadyBatches(bench.images, bench.targets, count), bench.ctx, bench.policy)

    def bare_forward(count: int, autocast: bool = True) -> None:
        model.eval()
        with torch.no_grad(), bench.policy.autocast() if autocast else nullcontext():
            for _ in range(count):
                model(bench.inputs)

    cam, all_classes = GradCAM(model), list(range(NUM_CLASSES))

    def gradcam(count: int) -> None:
        for _ in range(count):
            cam(bench.inputs, all_classes)

    steps, rounds = bench.args.steps, bench.args.rounds
    evaluation = round_seconds(bench.device, {"predict": our_predict, "forward": bare_forward}, bench.args.warmup,
                               steps, rounds)
    # Both without autocast, the way explain.py calls Grad-CAM.
    explanation = round_seconds(bench.device, {"gradcam": gradcam, "forward": lambda count: bare_forward(count, False)},
                                1, steps, rounds)
    return evaluation, explanation


def measure_predict_files(bench: Bench, model: CXRNet) -> dict[str, list[float]]:
    """scripts/predict.py's path (Classifier.iter_predict over the PNG files: decode in --workers processes,
    preprocessing, batches, forward) vs a bare no_grad forward of as many ready batches; seconds per round."""
    from cxr.predict import Classifier

    clf = Classifier(model, bench.config, {"config": bench.config.to_dict()}, bench.device, batch_size=bench.args.batch_size,
                     workers=bench.args.workers)
    batches = PREDICT_FILES_PASSES * bench.args.steps
    rows = np.resize(np.arange(len(bench.data.index)), batches * bench.args.batch_size)
    items = [(bench.data.index.image_names[row], bench.data.index.image_path(row)) for row in rows]

    def files(count: int) -> None:
        for _ in clf.iter_predict(items[: count * bench.args.batch_size]):
            pass

    def forward(count: int) -> None:
        with torch.no_grad(), bench.policy.autocast():
            for _ in range(count):
                model(bench.inputs)

    seconds = round_seconds(bench.device, {"files": files, "forward": forward}, 1, batches, bench.args.rounds)
    model.train()
    return seconds


def measure_explanation_methods(bench: Bench, model: CXRNet) -> dict[str, float]:
    """Each explanation method's cost for the maps of all 14 classes of the batch, relative to one no-grad forward.

    Occlusion (patch input/8, stride input/16) runs on the batch's first image and is scaled by the batch size:
    its cost is linear in the images, and a whole batch would take minutes on CPU.
    """
    from cxr.explainer import build_saliency

    inputs, batch = bench.inputs, bench.inputs.shape[0]
    size = inputs.shape[-1]
    specs = {"gradcam": ("gradcam", None), "gradcam++": ("gradcam++", None), "layercam": ("layercam", None),
             "hirescam": ("hirescam", None), "layercam@features.denseblock2": ("layercam", "features.denseblock2"),
             "occlusion": ("occlusion", None)}
    works: dict[str, Callable[[int], Any]] = {}
    for label, (method, layer) in specs.items():
        saliency = build_saliency(model, method, layer, max(1, size // 8), max(1, size // 16))
        images = inputs[:1] if method == "occlusion" else inputs
        works[label] = lambda count, saliency=saliency, images=images: [saliency(images, list(range(NUM_CLASSES))) for _ in range(count)]

    def forward(count: int) -> None:
        model.eval()
        with torch.no_grad():
            for _ in range(count):
                model(inputs)

    seconds = round_seconds(bench.device, {**works, "forward": forward}, 1, 1, bench.args.rounds)
    return {f"explain_{label}14_vs_forward": median(seconds[label]) * (batch if specs[label][0] == "occlusion" else 1)
            / median(seconds["forward"]) for label in specs}


def measure_data_wait(bench: Bench, step: OurStep, phase: int) -> dict[str, float]:
    """One whole epoch over the cached --epoch-images set from a freshly built loader (its persistent workers start
    cold, as at the start of train.py), feeding our `phase` step: seconds waiting for batches (the first batch,
    worker start-up included, and the rest) and seconds in all, from asking for the first batch to the last step."""
    rows = np.resize(np.arange(len(bench.data.index)), bench.args.epoch_images)
    loader = make_loader(bench.dataset(rows, cached=True), bench.config, bench.ctx, train=True)
    start_epoch(loader, bench.config, bench.ctx, 0)
    timer = WaitTimer(loader)
    step.phase(phase)
    step(timer, len(loader))
    synchronize(bench.device)
    ended = time.perf_counter()
    del loader, timer.loader  # its workers go with it: every epoch measured starts cold
    if len(timer.waits) != len(rows) // bench.args.batch_size:
        raise RuntimeError(f"the loader gave {len(timer.waits)} batches, expected {len(rows) // bench.args.batch_size}")
    return {"first_batch": timer.waits[0], "later_batches": sum(timer.waits[1:]), "epoch": ended - timer.requested[0],
            "images": len(timer.waits) * bench.args.batch_size}


def measure_data_waits(bench: Bench, step: OurStep) -> dict[str, list[float]]:
    """measure_data_wait for phase 1 and phase 2, alternating, min(--rounds, 3) cold epochs each."""
    results: dict[str, list[float]] = {}
    for _ in range(min(bench.args.rounds, 3)):
        for phase in (1, 2):
            for name, value in measure_data_wait(bench, step, phase).items():
                results.setdefault(f"phase{phase}_{name}", []).append(value)
    step.phase("all")
    return results


def measure_high_resolution(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Full-trunk training steps at --highres-size with and without --memory-efficient, each in a fresh process
    (so that one's peak memory cannot hide the other's): step seconds, peak RSS and, on CUDA, peak GPU memory."""
    figures: dict[str, float] = {}
    steps = max(2, min(args.steps, 3))
    for efficient in (False, True):
        spec = f"{args.highres_size},{args.highres_batch},{steps},{int(efficient)},{device}"
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--highres-child", spec],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the {args.highres_size} px step (memory-efficient {efficient}) failed:\n"
                               f"{done.stderr[-2000:]}")
        name = f"highres{args.highres_size}_{'memory_efficient' if efficient else 'plain'}"
        for key, value in json.loads(done.stdout.strip().splitlines()[-1]).items():
            figures[f"{name}_{key}"] = value
    for key in ("step_seconds", "peak_rss_mb", "peak_gpu_memory_gb"):
        plain = figures.get(f"highres{args.highres_size}_plain_{key}")
        if plain:
            figures[f"highres{args.highres_size}_memory_efficient_vs_plain_{key}"] = (
                figures[f"highres{args.highres_size}_memory_efficient_{key}"] / plain)
    return figures


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MB, from /proc; NaN where there is no /proc.

    Not getrusage's ru_maxrss: Linux carries it over from the parent through fork and exec, so a child started by
    a big parent reports the parent's size."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return math.nan
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":")) / 1024


def high_resolution_child(spec: str) -> int:
    """One setting of measure_high_resolution, in this fresh process; prints its figures as one JSON line."""
    size, batch, steps, efficient, device_name = spec.split(",")
    size, batch, steps, efficient = int(size), int(batch), int(steps), efficient == "1"
    device = torch.device(device_name)
    config = Config(image_size=size, batch_size=batch, device=device.type, unfreeze="all", weights="none",
                    memory_efficient=efficient)
    ctx = DistContext(rank=0, local_rank=0, world_size=1, device=device)
    policy = device_policy(config, device)
    memory_format = torch.channels_last if policy.channels_last else torch.contiguous_format
    model = model_for_config(config, memory_efficient=efficient).to(device, memory_format=memory_format)
    step = OurStep(model, config, ctx, policy, steps_per_epoch=10 * steps)
    step.phase("all")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, generator=generator)
    targets = (torch.rand(batch, NUM_CLASSES, generator=generator) < 0.1).float()
    before_mb = memory_mb("VmRSS")
    step([(images, targets, None)], 1)  # warm-up
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        started = time.perf_counter()
        step([(images, targets, None)], 1)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    figures = {"step_seconds": median(seconds), "peak_rss_mb": memory_mb("VmHWM"), "rss_before_training_mb": before_mb}
    if device.type == "cuda":
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    print(json.dumps(figures), flush=True)
    return 0


def run(args: argparse.Namespace, device: torch.device, workdir: Path) -> dict:
    """All measurements; returns the report dict (settings, figures, ratios and their spread, goals)."""
    started, cuda, batch, steps = time.perf_counter(), device.type == "cuda", args.batch_size, args.steps
    figures: dict[str, float] = {}
    rounds: dict[str, list[float]] = {}  # per-round values of each ratio
    bench = set_up(args, device, workdir, figures)
    note(started, f"{len(bench.data.index)} files ready and cached; per-core image pipelines")
    rates = measure_image_pipelines(bench)
    figures.update({f"{name}_images_per_s_per_core": median(rate) for name, rate in rates.items()})
    rounds["png_pipeline_vs_decode"] = per_round(rates["png_pipeline"], rates["decode"])
    rounds["cache_vs_png_pipeline"] = per_round(rates["cache_pipeline"], rates["png_pipeline"])

    note(started, "training steps (all stages, phase 1, phase 2) vs bare")
    memory_format = torch.channels_last if bench.policy.channels_last else torch.contiguous_format
    model = model_for_config(bench.config).to(device, memory_format=memory_format)
    step = OurStep(model, bench.config, bench.ctx, bench.policy, steps_per_epoch=10 * (args.warmup + steps))
    training = measure_training(bench, step)
    for name, key in (("train_step", "ours"), ("bare_train_step", "bare"), ("train_step_phase1", "phase1"),
                      ("train_step_phase2", "phase2")):
        figures[f"{name}_images_per_s"] = steps * batch / median(training[key])
    rounds["train_step_vs_bare"] = per_round(training["bare"], training["ours"])
    if cuda:
        torch.cuda.empty_cache()  # the bare model is gone

    note(started, "predict vs bare forward; Grad-CAM vs forward")
    evaluation, explanation = measure_inference(bench, model)
    figures["predict_images_per_s"] = steps * batch / median(evaluation["predict"])
    figures["bare_forward_images_per_s"] = steps * batch / median(evaluation["forward"])
    figures["gradcam14_seconds_per_batch"] = median(explanation["gradcam"]) / steps
    figures["forward_seconds_per_batch"] = median(explanation["forward"]) / steps
    rounds["eval_vs_bare_forward"] = per_round(evaluation["forward"], evaluation["predict"])
    rounds["gradcam14_vs_forward"] = per_round(explanation["gradcam"], explanation["forward"])

    note(started, "predict.py's path over the PNG files vs bare forward")
    files = measure_predict_files(bench, model)
    figures["predict_files_images_per_s"] = PREDICT_FILES_PASSES * steps * batch / median(files["files"])
    figures["predict_bare_forward_images_per_s"] = PREDICT_FILES_PASSES * steps * batch / median(files["forward"])
    rounds["predict_files_vs_bare_forward"] = per_round(files["forward"], files["files"])

    note(started, f"DataLoader from cold workers feeding whole epochs of {args.epoch_images} images (phase 1, 2)")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    waits = measure_data_waits(bench, step)
    for phase in (1, 2):
        wait = [first + later for first, later in zip(waits[f"phase{phase}_first_batch"], waits[f"phase{phase}_later_batches"])]
        fraction = per_round(wait, waits[f"phase{phase}_epoch"])
        figures[f"data_wait_fraction_phase{phase}"] = median(fraction)
        figures[f"data_wait_first_batch_seconds_phase{phase}"] = median(waits[f"phase{phase}_first_batch"])
        figures[f"data_wait_after_first_batch_fraction_phase{phase}"] = median(
            per_round(waits[f"phase{phase}_later_batches"], waits[f"phase{phase}_epoch"]))
        figures[f"end_to_end_train_images_per_s_phase{phase}"] = median(per_round(waits[f"phase{phase}_images"],
                                                                                   waits[f"phase{phase}_epoch"]))
        if phase == 1:
            rounds["data_wait_fraction"] = fraction
    figures["data_wait_seconds"] = median([a + b for a, b in zip(waits["phase1_first_batch"], waits["phase1_later_batches"])])
    figures["end_to_end_train_images_per_s"] = figures["end_to_end_train_images_per_s_phase2"]
    figures["epoch_images"] = args.epoch_images
    figures["epoch_distinct_images"] = min(args.epoch_images, len(bench.data.index))
    if cuda:
        figures["gpu_train_images_per_s"] = figures["end_to_end_train_images_per_s"]
        figures["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    note(started, "evaluation report on NIH-sized predictions")
    figures.update(measure_evaluation_report())
    note(started, "explanation methods vs forward")
    figures.update(measure_explanation_methods(bench, model))  # costs, not goals: the Grad-CAM goal is the ratio above
    amp = "off" if bench.policy.amp_dtype is None else str(bench.policy.amp_dtype).replace("torch.", "")
    del step, model, bench  # the high-resolution processes get the memory
    if args.highres_size:
        note(started, f"{args.highres_size} px training step with and without --memory-efficient (fresh processes)")
        figures.update(measure_high_resolution(args, device))
    figures["total_seconds"] = time.perf_counter() - started

    ratios = {name: median(values) for name, values in rounds.items()}
    return {"device": f"{device} ({torch.cuda.get_device_name(device)})" if cuda else str(device),
            "cpu_count": cpu_count(), "torch_threads": torch.get_num_threads(), "amp": amp,
            "memory_format": "channels_last" if memory_format == torch.channels_last else "contiguous",
            "image_size": args.image_size, "batch_size": batch, "steps": steps, "warmup": args.warmup,
            "rounds": args.rounds, "workers": args.workers, "epoch_images": args.epoch_images,
            "figures": {name: significant(value) for name, value in figures.items()},
            "ratios": {name: significant(ratios[name]) for name in GOALS},
            "spread": {name: significant(spread(rounds[name])) for name in GOALS},
            "ratio_rounds": {name: [significant(value) for value in rounds[name]] for name in GOALS},
            "goals": {name: f"{op} {limit:g}" for name, (op, limit) in GOALS.items()},
            "goals_met": {name: meets(ratios[name], *GOALS[name]) for name in GOALS}}


def planted_predictions(images: int, patients: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """NIH-like labels (real prevalences), informative scores, sorted patient ids and random metadata."""
    patient_ids = np.sort(rng.integers(0, patients, images))
    labels = (rng.random((images, NUM_CLASSES)) < np.array(NIH_PREVALENCE)).astype(np.float32)
    probabilities = 1 / (1 + np.exp(-(1.5 * labels + rng.normal(0, 1, labels.shape) - 2)))
    meta = {"ages": rng.integers(1, 95, images).astype(np.float32), "genders": rng.choice(["M", "F"], images),
            "views": rng.choice(["PA", "AP"], images), "follow_ups": rng.integers(0, 30, images).astype(np.int32)}
    return labels, probabilities, patient_ids, meta


def measure_evaluation_report(seed: int = 0) -> dict[str, float]:
    """Seconds on one core for evaluate.py's report and for compare_models.py's statistics on NIH-sized arrays."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    labels, probabilities, patient_ids, meta = planted_predictions(25_596, 2_797, rng)
    val_labels, val_probabilities, _, _ = planted_predictions(8_600, 2_800, rng)
    train_labels, _, _, train_meta = planted_predictions(77_900, 25_000, rng)
    other = np.clip(probabilities + rng.normal(0, 0.05, probabilities.shape), 0, 1)
    groups = {"sex": sex_groups(meta["genders"]), "age": age_groups(meta["ages"]), "view": view_groups(meta["views"])}
    with threadpool_limits(1):
        started = time.perf_counter()
        evaluation_report({"labels": val_labels, "probabilities": val_probabilities},
                          {"labels": labels, "probabilities": probabilities}, patient_ids, groups,
                          {**train_meta, "labels": train_labels}, meta, FINDINGS, n_resamples=1000, seed=seed)
        report_seconds = time.perf_counter() - started
        started = time.perf_counter()
        compare_predictions(labels, probabilities, other, patient_ids, FINDINGS, n_resamples=1000, seed=seed)
        comparison_seconds = time.perf_counter() - started
    return {"evaluation_report_seconds": report_seconds, "comparison_seconds": comparison_seconds,
            "full_evaluation_report_seconds": report_seconds + comparison_seconds}


def format_evaluation_report(figures: dict[str, float]) -> str:
    """One line per figure of measure_evaluation_report, the total against its goal."""
    total = figures["full_evaluation_report_seconds"]
    return (f"evaluation report, 25,596 x 14 predictions, one core: {figures['evaluation_report_seconds']:.2f} s "
            f"(bootstrap, calibration, subgroups, metadata baseline) + {figures['comparison_seconds']:.2f} s "
            f"(DeLong + paired bootstrap) = {total:.2f} s; goal < {EVALUATION_REPORT_GOAL_SECONDS:g} s: "
            f"{'yes' if total < EVALUATION_REPORT_GOAL_SECONDS else 'NO'}")


def note(started: float, text: str) -> None:
    """Progress on stderr, so that a long CPU run shows where it is."""
    print(f"benchmark [{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)


def meets(value: float, op: str, limit: float) -> bool:
    """True when `value op limit` holds."""
    return {">=": value >= limit, "<=": value <= limit, "<": value < limit}[op]


def significant(value: float, digits: int = 4) -> float:
    """Rounded to `digits` significant digits (a tiny fraction stays non-zero)."""
    return float(f"{value:.{digits}g}")


def cpu_count() -> int:
    """Cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def format_report(report: dict) -> str:
    """The header line, the ratio table and the raw figures."""
    lines = [f"device {report['device']}, {report['cpu_count']} CPU core(s), "
             f"{report['torch_threads']} torch thread(s), AMP {report['amp']}, {report['memory_format']}; "
             f"image {report['image_size']} px, batch {report['batch_size']}, {report['steps']} timed step(s), "
             f"{report['rounds']} round(s), {report['workers']} worker(s), {report['epoch_images']} images per "
             "data-wait epoch",
             "", f"{'ratio (median of rounds)':<30} {'measured':>10}  {'goal':<8} met  spread"]
    for name, value in report["ratios"].items():
        note = " (goal is for GPUs)" if name == "data_wait_fraction" and report["device"] == "cpu" else ""
        lines.append(f"{name:<30} {value:>10.4g}  {report['goals'][name]:<8} "
                     f"{'yes' if report['goals_met'][name] else 'NO ':<4} +-{100 * report['spread'][name]:.1f}%{note}")
    lines += ["", "figures:"] + [f"  {name:<40} {value:.4g}" for name, value in report["figures"].items()]
    if "full_evaluation_report_seconds" in report["figures"]:
        lines.append(format_evaluation_report(report["figures"]))
    if "gpu_train_images_per_s" in report["figures"]:
        lines.append(f"  (aim on one H100/H200 at 224 px with AMP and channels_last: >= {GPU_TRAIN_AIM:,.0f} images/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every benchmark, print the table, write the JSON; returns the exit code (2: bad input)."""
    return run_main(lambda: benchmark(parse_args(argv)), error_status=2)


def benchmark(args: argparse.Namespace) -> int:
    if args.highres_child:
        return high_resolution_child(args.highres_child)
    if args.only == "evaluation-report":
        figures = measure_evaluation_report()
        print(format_evaluation_report(figures), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"figures": {name: significant(value) for name, value in figures.items()},
                                                   "goal_seconds": EVALUATION_REPORT_GOAL_SECONDS,
                                                   "goal_met": figures["full_evaluation_report_seconds"] < EVALUATION_REPORT_GOAL_SECONDS},
                                                  indent=2) + "\n")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available here; use --device cpu")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")  # the first visible GPU
    resolve_defaults(args, cuda, cpu_count())
    if cuda:
        configure_cuda()  # the trainer's CUDA settings (device_policy applies them too)
    with tempfile.TemporaryDirectory(prefix="cxr-benchmark-") as workdir:
        report = run(args, device, Path(workdir))
    print(format_report(report), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
