"""Train DenseNet121 + head on NIH ChestX-ray14 (or the built-in synthetic set) with two-phase fine-tuning.

    python train.py                                            # demo: synthetic data, ~3 min on 2 CPU cores
    python train.py --data-dir /data/nih                       # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py --data-dir /data/nih  # DDP on 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --data-dir /data/nih
    python train.py --resume runs/20261201-120000              # continue exactly where it stopped, in that folder

Phase 1 (--warmup-epochs): trunk frozen, head trains. Phase 2: the last --unfreeze dense blocks train too,
at --lr * --trunk-lr-mult. Checkpoints (last.pt, best.pt), config.yaml and TensorBoard logs go to --out.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from cxr.checkpoint import build_checkpoint, load_checkpoint, resolve_checkpoint_path, restore_checkpoint, save_epoch_checkpoints
from cxr.config import Config, build_parser, config_for_resume, config_from_args
from cxr.device import device_policy
from cxr.distributed import RankZero, cleanup_distributed, setup_distributed
from cxr.engine import predict, train_one_epoch
from cxr.errors import run_main
from cxr.factory import (
    build_optimizer,
    build_scheduler,
    configure_phase,
    load_data,
    make_dataset,
    make_loader,
    open_cache,
    phase_of,
    resolve_data_dir,
    start_epoch,
    wrap_for_training,
)
from cxr.labels import FINDINGS
from cxr.losses import LabelSmoothedBCE, pos_weight_from_labels
from cxr.metrics import auroc_per_class, mean_auroc
from cxr.model import build_model
from cxr.rundir import open_run_dir
from cxr.seeding import seed_everything
from cxr.transforms import Preprocessing

DIVERGED_LOSS = 10 * math.log(2)  # ten times the loss of a constant 0.5 prediction: the run has blown up


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: train(argv))


def train(argv: list[str] | None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    resumed = None
    if args.resume:
        checkpoint_path = resolve_checkpoint_path(args.resume)
        resumed = load_checkpoint(checkpoint_path)
        config = config_for_resume(args, resumed["config"], run_dir=str(checkpoint_path.parent))
    else:
        config = config_from_args(args)
    ctx = setup_distributed(config.device)
    try:
        return run(config, resumed, ctx)
    finally:
        cleanup_distributed(ctx)


def run(config: Config, resumed: dict | None, ctx) -> int:
    seed_everything(config.seed, ctx.rank)
    log = RankZero(ctx, None)
    # Everything that only reads (data, cache) is checked before the run directory is created and locked.
    data = load_data(config, resolve_data_dir(config, ctx))
    preprocessing = Preprocessing.from_config(config)
    cache = open_cache(config, preprocessing)
    run_dir = open_run_dir(config, ctx, resuming=resumed is not None, log=log.print)
    try:
        return fit(config, resumed, ctx, run_dir.path, data, preprocessing, cache)
    finally:
        run_dir.close()


def fit(config: Config, resumed: dict | None, ctx, run_dir: Path, data, preprocessing: Preprocessing, cache) -> int:
    log = RankZero(ctx, run_dir / "tensorboard", config.tensorboard)
    policy = device_policy(config, ctx.device)
    log.print(f"cxr train: {'resuming ' if resumed else 'run '}{run_dir}; {ctx.world_size} process(es); {policy.describe()}")
    log.print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    log.print(data.summary())
    train_set = make_dataset(config, data, "train", preprocessing, train=True, cache=cache)
    val_set = make_dataset(config, data, "val", preprocessing, train=False, cache=cache)
    train_loader = make_loader(train_set, config, ctx, train=True)
    val_loader = make_loader(val_set, config, ctx, train=False, batch_size=config.batch_size * 2)

    weights = config.weights if config.weights != "auto" else ("none" if config.is_demo else "imagenet")
    model = build_model("none" if resumed else weights, config.hidden_sizes, config.dropout, config.output_stride, config.pool, config.lse_r)
    if config.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    policy.prepare_model(model)
    optimizer = build_optimizer(model, config)
    steps_per_epoch = min(len(train_loader), config.max_steps_per_epoch or len(train_loader))
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=policy.uses_grad_scaler)
    pos_weight = pos_weight_from_labels(data.index.labels[data.splits["train"]]).to(ctx.device) if config.pos_weight else None
    loss_fn = LabelSmoothedBCE(config.label_smoothing, pos_weight)

    state = {"epoch": 0, "global_step": 0, "best_metric": float("-inf"), "best_epoch": -1, "bad_epochs": 0, "history": []}
    if resumed:
        configure_phase(model, resumed["phase"], config)  # optimizer state matches this phase's parameters
        state = restore_checkpoint(resumed, model, optimizer, scheduler, scaler)
        log.print(f"resumed from epoch {state['epoch']} (best val mean AUROC {state['best_metric']:.4f})")
    else:
        log.print(f"weights: {weights}")
    if log.writer is not None:  # what the network sees, after augmentation
        images, _, _ = next(iter(torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=False)))
        log.add_image("train/augmented_inputs", _grid(images), state["epoch"])

    phase, wrapped = None, None
    for epoch in range(state["epoch"], config.epochs):
        if phase_of(epoch, config) != phase:
            phase = phase_of(epoch, config)
            trainable = configure_phase(model, phase, config)
            wrapped = wrap_for_training(model, config, ctx)
            log.print(f"phase {phase}: training the head" + (f" and trunk stages {sorted(trainable)}" if trainable else " (trunk frozen)"))
        start_epoch(train_loader, config, ctx, epoch)
        stats = train_one_epoch(wrapped, loss_fn, optimizer, train_loader, ctx, log, policy, epoch=epoch,
                                global_step=state["global_step"], scaler=scaler,
                                step_scheduler=scheduler.step if config.scheduler == "cosine" else None,
                                max_steps=config.max_steps_per_epoch, log_every=config.log_every, grad_clip=config.grad_clip)
        state["global_step"] = stats["global_step"]
        val = predict(model, val_loader, ctx, policy, loss_fn, desc=f"epoch {epoch + 1} val", log=log)
        aurocs = auroc_per_class(val["labels"], val["probabilities"])
        val_auroc = mean_auroc(aurocs)
        if config.scheduler == "plateau":
            scheduler.step(val_auroc if np.isfinite(val_auroc) else 0.0)
        # A validation split in which no finding has both labels has no AUROC; select by loss then (fixed per run).
        selection = val_auroc if np.isfinite(val_auroc) else -val["loss"]
        if epoch == state["epoch"] == 0 and not np.isfinite(val_auroc):
            log.print("warning: no finding has both labels in the validation split, so AUROC is undefined; "
                      "selecting checkpoints by validation loss (use a larger --val-fraction)")
        improved = selection > state["best_metric"]
        if improved:
            state.update(best_metric=float(selection), best_epoch=epoch, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "phase": phase, "train_loss": stats["loss"], "val_loss": val["loss"],
                                 "val_mean_auroc": float(val_auroc), "images_per_s": stats["images_per_s"]})
        log.print(f"epoch {epoch + 1}/{config.epochs} phase {phase}: train loss {stats['loss']:.4f} "
                  f"({stats['images_per_s']:.1f} img/s), val loss {val['loss']:.4f}, val mean AUROC {val_auroc:.4f}"
                  + (" (best)" if improved else ""))
        if stats["loss"] > DIVERGED_LOSS:
            log.print(f"WARNING: the training loss {stats['loss']:.4g} is over {DIVERGED_LOSS / math.log(2):.0f} times that of "
                      "a constant prediction: training is diverging; lower --lr (or use --grad-clip)")
        log.add_scalars_flat({"loss": val["loss"], "mean_auroc": val_auroc}, epoch + 1, "val")
        log.add_scalars_flat({name: float(value) for name, value in zip(FINDINGS, aurocs)}, epoch + 1, "val_auroc")
        log.add_scalar("train/epoch_loss", stats["loss"], epoch + 1)
        log.add_scalar("train/images_per_s", stats["images_per_s"], epoch + 1)
        if ctx.is_main:
            checkpoint = build_checkpoint(model, optimizer, scheduler, scaler, config=config.to_dict(), phase=phase,
                                          counters=state, val_aurocs=aurocs)
            save_epoch_checkpoints(checkpoint, run_dir, improved)
        if state["bad_epochs"] >= config.patience:
            log.print(f"early stopping: no better validation mean AUROC for {config.patience} epochs")
            break
    log.close()
    if ctx.is_main:
        print_next_steps(run_dir, state, config)
    return 0


def _grid(images: torch.Tensor) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.float() / 255.0, nrow=4)


def print_next_steps(run_dir: Path, state: dict, config: Config) -> None:
    best = run_dir / "best.pt"
    metric = "mean AUROC" if state["best_metric"] >= 0 else "score (minus the loss: AUROC undefined on this split)"
    print(f"\ndone: best validation {metric} {state['best_metric']:.4f} at epoch {state['best_epoch'] + 1}")
    if state["history"] and state["history"][-1]["train_loss"] > DIVERGED_LOSS:
        print("WARNING: training diverged (see the loss above); these checkpoints are not worth evaluating")
    print(f"run directory:   {run_dir}")
    print(f"best checkpoint: {best}")
    print(f"TensorBoard:     tensorboard --logdir {run_dir / 'tensorboard'}")
    print("next:")
    print(f"  python evaluate.py --checkpoint {best}")
    print(f"  python explain.py --checkpoint {best} --data-dir {config.data_dir or '<demo data>'} --split test")


if __name__ == "__main__":
    sys.exit(main())
