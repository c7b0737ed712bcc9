"""train.py's epoch loop: phases, validation every --val-every epochs, checkpoints, metrics.jsonl, preemption.

    code = fit(config, resumed, ctx, run_dir)   # 0 when done; PREEMPTED_EXIT_CODE after SIGTERM/SIGUSR1

This module imports cxr.engine, which the guide reserves for entry scripts: it *is* train.py's loop, moved
here so that train.py stays a thin wiring script; only train.py imports it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cxr.checkpoint import CheckpointError, build_checkpoint, restore_checkpoint, save_epoch_checkpoints
from cxr.config import Config
from cxr.data import NihData
from cxr.device import device_policy
from cxr.distributed import DistContext, RankZero, any_rank, average_buffers
from cxr.engine import NonFiniteLossError, predict, train_one_epoch
from cxr.factory import (
    build_optimizer,
    build_scheduler,
    configure_phase,
    load_data,
    make_dataset,
    make_loader,
    model_for_config,
    open_cache,
    phase_of,
    resolve_data_dir,
    start_epoch,
    wrap_for_training,
)
from cxr.labels import FINDINGS
from cxr.losses import LabelSmoothedBCE, pos_weight_from_labels
from cxr.metrics import auroc_per_class, mean_auroc
from cxr.preemption import PREEMPTED_EXIT_CODE, StopSignals
from cxr.rundir import append_metrics
from cxr.transforms import Preprocessing

DIVERGED_LOSS = 10 * math.log(2)  # ten times the loss of a constant 0.5 prediction: the run has blown up


def fresh_state() -> dict[str, Any]:
    """The counters of a run that has not trained yet (checkpoint.COUNTER_KEYS)."""
    return {"epoch": 0, "global_step": 0, "best_metric": float("-inf"), "best_epoch": -1, "bad_epochs": 0,
            "history": [], "position": {}}


def load_inputs(config: Config, ctx: DistContext) -> tuple[NihData, Preprocessing, object]:
    """Data, preprocessing and cache: everything that only reads, checked before the run directory is created."""
    data = load_data(config, resolve_data_dir(config, ctx))
    preprocessing = Preprocessing.from_config(config)
    return data, preprocessing, open_cache(config, preprocessing)


def fit(config: Config, resumed: dict | None, ctx: DistContext, run_dir: Path,
        inputs: tuple[NihData, Preprocessing, object]) -> int:
    """Train from `resumed` (a loaded checkpoint) or from scratch; returns the process exit code."""
    data, preprocessing, cache = inputs
    log = RankZero(ctx, run_dir / "tensorboard", config.tensorboard)
    policy = device_policy(config, ctx.device)
    log.print(f"cxr train: {'resuming ' if resumed else 'run '}{run_dir}; {ctx.world_size} process(es); {policy.describe()}; "
              f"global batch {config.batch_size * ctx.world_size * config.accum_steps}")
    log.print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())

    log.print(data.summary())
    train_set = make_dataset(config, data, "train", preprocessing, train=True, cache=cache)
    val_set = make_dataset(config, data, "val", preprocessing, train=False, cache=cache)
    train_loader = make_loader(train_set, config, ctx, train=True)
    val_loader = make_loader(val_set, config, ctx, train=False, batch_size=config.eval_batch_size)

    weights = config.weights if config.weights != "auto" else ("none" if config.is_demo else "imagenet")
    model = model_for_config(config, "none" if resumed else weights, memory_efficient=config.memory_efficient)
    if config.sync_bn and ctx.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    policy.prepare_model(model)
    optimizer = build_optimizer(model, config)
    steps_per_epoch = min(len(train_loader) // config.accum_steps, config.max_steps_per_epoch or len(train_loader))
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=policy.uses_grad_scaler)
    pos_weight = pos_weight_from_labels(data.index.labels[data.splits["train"]]).to(ctx.device) if config.pos_weight else None
    loss_fn = LabelSmoothedBCE(config.label_smoothing, pos_weight)

    state = fresh_state()
    if resumed:
        configure_phase(model, resumed["phase"], config)  # optimizer state matches this phase's parameters
        try:
            state = restore_checkpoint(resumed, model, optimizer, scheduler, scaler)
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{run_dir}: the checkpoint does not fit the model and optimizer its own config "
                                  f"describes ({str(error).splitlines()[0][:300]}); start a new run with another --out") from error
        where = f", batch {state['position']['batches']} of epoch {state['epoch'] + 1}" if state["position"] else ""
        log.print(f"resumed from epoch {state['epoch']}{where} (best val mean AUROC {state['best_metric']:.4f})")
    else:
        log.print(f"weights: {weights}")
    if log.writer is not None and not state["position"]:  # what the network sees, after augmentation
        images, _, _ = next(iter(torch.utils.data.DataLoader(train_set, batch_size=16, shuffle=False)))
        log.add_image("train/augmented_inputs", _grid(images), state["epoch"])

    phase, wrapped, first_epoch = None, None, state["epoch"]
    with StopSignals() as stop:
        for epoch in range(state["epoch"], config.epochs):
            epoch_started = time.perf_counter()
            if phase_of(epoch, config) != phase:
                phase = phase_of(epoch, config)
                trainable = configure_phase(model, phase, config)
                wrapped = wrap_for_training(model, config, ctx)
                log.print(f"phase {phase}: training the head" + (f" and trunk stages {sorted(trainable)}" if trainable else " (trunk frozen)"))
            position, state["position"] = state["position"], {}
            start_epoch(train_loader, config, ctx, epoch, skip_batches=position.get("batches", 0))
            stats = train_one_epoch(wrapped, loss_fn, optimizer, train_loader, ctx, log, policy, epoch=epoch,
                                    global_step=state["global_step"], scaler=scaler,
                                    step_scheduler=scheduler.step if config.scheduler == "cosine" else None,
                                    max_steps=config.max_steps_per_epoch, log_every=config.log_every,
                                    grad_clip=config.grad_clip, accum_steps=config.accum_steps, seed=config.seed,
                                    stop_requested=stop.requested, position=position)
            state["global_step"] = stats["global_step"]
            average_buffers(model, ctx)  # DDP does not broadcast them (broadcast_buffers=False)
            if stats["interrupted"]:
                state["position"] = stats["position"]
                _save(model, optimizer, scheduler, scaler, config, phase, state, (), run_dir, ctx, improved=False)
                log.print(f"stopped by {stop.received or 'a signal on another rank'} after {stats['position']['batches']} "
                          f"batches of epoch {epoch + 1}: {run_dir / 'last.pt'} holds that position; continue with "
                          f"--resume {run_dir} (exit code {PREEMPTED_EXIT_CODE})")
                return PREEMPTED_EXIT_CODE
            validated = (epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs
            improved, aurocs, val = _validate(model, val_loader, ctx, policy, loss_fn, log, config, state, epoch) if validated else (False, (), None)
            if val is not None and config.scheduler == "plateau":
                scheduler.step(val["mean_auroc"] if np.isfinite(val["mean_auroc"]) else 0.0)
            state["epoch"] = epoch + 1
            record = _record(epoch, phase, stats, val, aurocs, optimizer, time.perf_counter() - epoch_started)
            state["history"].append({key: record[key] for key in ("epoch", "phase", "train_loss", "val_loss", "val_mean_auroc", "images_per_s")})
            _report(log, config, record, improved)
            if ctx.is_main:
                append_metrics(run_dir, record)  # before the checkpoint: a redone epoch replaces its line
            _save(model, optimizer, scheduler, scaler, config, phase, state, aurocs, run_dir, ctx, improved)
            if epoch == first_epoch and epoch + 1 < config.epochs:
                remaining = (config.epochs - epoch - 1) * record["epoch_seconds"]
                log.print(f"projected: {config.epochs - epoch - 1} more epoch(s) at {record['epoch_seconds']:.1f} s each, "
                          f"about {remaining / 60:.1f} min")
            if any_rank(stop.requested(), ctx):  # a signal during validation or the checkpoint write: stop now
                log.print(f"stopped by a signal at the end of epoch {epoch + 1}; continue with --resume {run_dir} "
                          f"(exit code {PREEMPTED_EXIT_CODE})")
                return PREEMPTED_EXIT_CODE
            if state["bad_epochs"] >= config.patience:
                log.print(f"early stopping: no better validation mean AUROC for {config.patience} validation(s)")
                break
    log.close()
    return 0


def _validate(model, val_loader, ctx, policy, loss_fn, log, config, state, epoch) -> tuple[bool, Any, dict]:
    """Predict the validation split, step the plateau schedule, update best/bad counters; (improved, aurocs, val)."""
    val = predict(model, val_loader, ctx, policy, loss_fn, desc=f"epoch {epoch + 1} val", log=log)
    aurocs = auroc_per_class(val["labels"], val["probabilities"])
    val["mean_auroc"] = val_auroc = mean_auroc(aurocs)
    # A validation split in which no finding has both labels has no AUROC; select by loss then (fixed per run).
    selection = val_auroc if np.isfinite(val_auroc) else -val["loss"]
    if not state["history"] and not np.isfinite(val_auroc):
        log.print("warning: no finding has both labels in the validation split, so AUROC is undefined; "
                  "selecting checkpoints by validation loss (use a larger --val-fraction)")
    improved = selection > state["best_metric"]
    if improved:
        state.update(best_metric=float(selection), best_epoch=epoch, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    return improved, aurocs, val


def _record(epoch: int, phase: int, stats: dict, val: dict | None, aurocs: Any, optimizer, seconds: float) -> dict:
    """One line of metrics.jsonl (None for validation fields in epochs without validation)."""
    return {"epoch": epoch + 1, "phase": phase, "global_step": stats["global_step"], "train_loss": stats["loss"],
            "val_loss": val["loss"] if val else None, "val_mean_auroc": _finite_or_none(val["mean_auroc"]) if val else None,
            "val_auroc": {name: _finite_or_none(value) for name, value in zip(FINDINGS, aurocs)} if val else None,
            "lr": {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)},
            "images_per_s": stats["images_per_s"], "data_wait_fraction": stats["data_wait_fraction"],
            "epoch_seconds": seconds}


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: an undefined AUROC (one label value only) is written as null."""
    return float(value) if np.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value


def _report(log: RankZero, config: Config, record: dict, improved: bool) -> None:
    """The epoch's line on the console and its TensorBoard scalars."""
    epoch, val = record["epoch"], record["val_loss"] is not None
    log.print(f"epoch {epoch}/{config.epochs} phase {record['phase']}: train loss {record['train_loss']:.4f} "
              f"({record['images_per_s']:.1f} img/s, data wait {100 * record['data_wait_fraction']:.1f}%)"
              + (f", val loss {record['val_loss']:.4f}, val mean AUROC {_nan_if_none(record['val_mean_auroc']):.4f}" if val else "")
              + (" (best)" if improved else ""))
    if record["train_loss"] > DIVERGED_LOSS:
        log.print(f"WARNING: the training loss {record['train_loss']:.4g} is over {DIVERGED_LOSS / math.log(2):.0f} times "
                  "that of a constant prediction: training is diverging; lower --lr (or use --grad-clip)")
    if val:
        log.add_scalars_flat({"loss": record["val_loss"], "mean_auroc": _nan_if_none(record["val_mean_auroc"])}, epoch, "val")
        log.add_scalars_flat({name: _nan_if_none(value) for name, value in record["val_auroc"].items()}, epoch, "val_auroc")
    log.add_scalar("train/epoch_loss", record["train_loss"], epoch)
    log.add_scalar("train/images_per_s", record["images_per_s"], epoch)


def _save(model, optimizer, scheduler, scaler, config: Config, phase: int, state: dict, aurocs: Any, run_dir: Path,
          ctx: DistContext, improved: bool) -> None:
    """Rank 0 writes last.pt (and best.pt when `improved`); weights with NaN/inf are refused on every rank."""
    finite = torch.stack([torch.isfinite(tensor).all() for tensor in model.state_dict().values()
                          if tensor.is_floating_point()]).all()
    if not bool(finite):  # identical weights on every rank under DDP: every rank raises here together
        raise NonFiniteLossError(f"the model holds NaN/inf values after epoch {state['epoch']}; no checkpoint written "
                                 "(lower --lr, check the data, or try --amp off)")
    if ctx.is_main:
        checkpoint = build_checkpoint(model, optimizer, scheduler, scaler, config=config.to_dict(), phase=phase,
                                      counters=state, val_aurocs=aurocs)
        save_epoch_checkpoints(checkpoint, run_dir, improved)


def _grid(images: torch.Tensor) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.float() / 255.0, nrow=4)
