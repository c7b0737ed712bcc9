"""Train DenseNet121 + head on NIH ChestX-ray14 (or the built-in synthetic set) with two-phase fine-tuning.

    python train.py                                            # demo: synthetic data, ~3 min on 2 CPU cores
    python train.py --data-dir /data/nih                       # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py --data-dir /data/nih  # DDP on 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --data-dir /data/nih
    python train.py --resume runs/20261201-120000              # continue exactly where it stopped

Phase 1 (--warmup-epochs): trunk frozen, head trains. Phase 2: the last --unfreeze dense blocks train too,
at --lr * --trunk-lr-mult. Checkpoints (last.pt, best.pt), config.yaml and TensorBoard logs go to --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from cxr.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    model_state_for_saving,
    resolve_checkpoint_path,
    save_checkpoint,
)
from cxr.config import Config, build_parser, config_from_args
from cxr.data import DataError
from cxr.distributed import RankZero, broadcast_object, cleanup_distributed, seed_everything, setup_distributed
from cxr.engine import NonFiniteLossError, predict, train_one_epoch
from cxr.factory import (
    build_optimizer,
    build_scheduler,
    device_policy,
    load_data,
    make_dataset,
    make_loader,
    open_cache,
    resolve_data_dir,
    start_epoch,
)
from cxr.labels import FINDINGS
from cxr.losses import LabelSmoothedBCE, pos_weight_from_labels
from cxr.metrics import auroc_per_class, mean_auroc
from cxr.model import CXRNet, WeightsUnavailableError, build_model, stages_to_unfreeze


def resolve_config(argv: list[str] | None) -> tuple[Config, dict | None]:
    """Flags -> Config; with --resume, the run's own config with only the explicitly given flags changed."""
    args = build_parser(__doc__).parse_args(argv)
    if not args.resume:
        return config_from_args(args), None
    checkpoint = load_checkpoint(resolve_checkpoint_path(args.resume))
    values = Config.from_dict(checkpoint["config"]).to_dict()
    values.update({name: value for name, value in vars(args).items() if name in values and value is not None})
    config = Config(**values)
    if not config.out:
        config.out = str(Path(resolve_checkpoint_path(args.resume)).parent)
    return config, checkpoint


def phase_of(epoch: int, config: Config) -> int:
    return 1 if epoch < config.warmup_epochs else 2


def configure_phase(model: CXRNet, phase: int, config: Config) -> set[str]:
    """Freeze the trunk (phase 1) or unfreeze the requested blocks (phase 2); returns the trainable stages."""
    trainable = set() if phase == 1 else stages_to_unfreeze(config.unfreeze)
    model.set_trainable_stages(trainable)
    return trainable


def wrap_for_training(model: CXRNet, config: Config, ctx) -> torch.nn.Module:
    """DDP must be rebuilt whenever the set of trainable parameters changes (it registers them at construction)."""
    wrapped: torch.nn.Module = model
    if config.compile:
        wrapped = torch.compile(wrapped)
    if ctx.distributed:
        wrapped = DistributedDataParallel(wrapped, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return wrapped


def main(argv: list[str] | None = None) -> int:
    try:
        config, resumed = resolve_config(argv)
    except (CheckpointError, FileNotFoundError) as error:
        print(f"error: --resume: {error}", file=sys.stderr)
        return 1
    ctx = setup_distributed(config.device)
    try:
        return run(config, resumed, ctx)
    except (DataError, NonFiniteLossError, CheckpointError, WeightsUnavailableError, FileNotFoundError, ValueError) as error:
        if ctx.is_main:
            print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        cleanup_distributed(ctx)


def prepare_run_dir(config: Config, ctx) -> Path:
    """The run directory (rank 0 picks a timestamped one when --out is empty) with the resolved config.yaml."""
    if ctx.is_main and not config.out:
        config.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if ctx.distributed:  # every rank must agree on the directory chosen by rank 0
        config.out = broadcast_object(config.out, ctx)
    run_dir = Path(config.out)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_dir


def run(config: Config, resumed: dict | None, ctx) -> int:
    seed_everything(config.seed, ctx.rank)
    run_dir = prepare_run_dir(config, ctx)
    log = RankZero(ctx, run_dir / "tensorboard", config.tensorboard)
    policy = device_policy(config, ctx)
    log.print(f"cxr train: {'resuming ' + config.out if resumed else 'run ' + config.out}; {ctx.world_size} process(es); {policy.describe()}")
    log.print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())

    data_dir = resolve_data_dir(config, ctx)
    data = load_data(config, data_dir)
    log.print(data.summary())
    cache = open_cache(config)
    train_set = make_dataset(config, data, "train", train=True, cache=cache)
    val_set = make_dataset(config, data, "val", train=False, cache=cache)
    train_loader = make_loader(train_set, config, ctx, train=True)
    val_loader = make_loader(val_set, config, ctx, train=False, batch_size=config.batch_size * 2)

    weights = config.weights if config.weights != "auto" else ("none" if config.is_demo else "imagenet")
    model = build_model("none" if resumed else weights, config.hidden_sizes, config.dropout, config.output_stride)
    if config.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(ctx.device, memory_format=torch.channels_last if policy.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, config)
    steps_per_epoch = min(len(train_loader), config.max_steps_per_epoch or len(train_loader))
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=policy.uses_grad_scaler)
    train_labels = data.index.labels[data.splits["train"]]
    pos_weight = pos_weight_from_labels(train_labels).to(ctx.device) if config.pos_weight else None
    loss_fn = LabelSmoothedBCE(config.label_smoothing, pos_weight)

    state = {"epoch": 0, "global_step": 0, "best_metric": float("-inf"), "best_epoch": -1, "bad_epochs": 0, "history": []}
    if resumed:
        model.load_state_dict(resumed["model"])
        configure_phase(model, resumed["phase"], config)  # optimizer state matches this phase's parameters
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        state.update({key: resumed[key] for key in state})
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
        log.add_scalars_flat({"loss": val["loss"], "mean_auroc": val_auroc}, epoch + 1, "val")
        log.add_scalars_flat({name: float(value) for name, value in zip(FINDINGS, aurocs)}, epoch + 1, "val_auroc")
        log.add_scalar("train/epoch_loss", stats["loss"], epoch + 1)
        log.add_scalar("train/images_per_s", stats["images_per_s"], epoch + 1)
        if ctx.is_main:
            checkpoint = {"model": model_state_for_saving(model), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "phase": phase,
                          "rng": capture_rng_state(), "config": config.to_dict(), "class_names": list(FINDINGS),
                          "val_aurocs": [float(value) for value in aurocs], **state}
            save_checkpoint(checkpoint, run_dir / "last.pt")
            if improved:
                save_checkpoint(checkpoint, run_dir / "best.pt")
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
    print(f"run directory:   {run_dir}")
    print(f"best checkpoint: {best}")
    print(f"TensorBoard:     tensorboard --logdir {run_dir / 'tensorboard'}")
    print("next:")
    print(f"  python evaluate.py --checkpoint {best}")
    print(f"  python explain.py --checkpoint {best} --data-dir {config.data_dir or '<demo data>'} --split test")


if __name__ == "__main__":
    sys.exit(main())
