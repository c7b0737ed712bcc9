"""The training step loop and exact distributed prediction; everything arrives as arguments, plain data returns.

    stats = train_one_epoch(model, loss_fn, optimizer, loader, ctx, log, policy, epoch=0, global_step=0)
    result = predict(model, loader, ctx, policy, loss_fn)     # every sample once, in dataset order
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr.data import unwrap_worker_errors
from cxr.device import DevicePolicy
from cxr.distributed import DistContext, RankZero, any_rank, gather_predictions
from cxr.errors import CxrError


class NonFiniteLossError(CxrError, RuntimeError):
    """The loss became NaN/inf on some rank; every rank raises it together."""


def train_one_epoch(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, loader: Any,
                    ctx: DistContext, log: RankZero, policy: DevicePolicy, *, epoch: int, global_step: int,
                    scaler: torch.amp.GradScaler | None = None, step_scheduler: Callable[[], None] | None = None,
                    max_steps: int = 0, log_every: int = 20, grad_clip: float = 0.0) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, steps, images/s and the new global step."""
    model.train()
    loss_sum = torch.zeros((), device=policy.device)
    steps = images_seen = 0
    started = time.perf_counter()
    total = min(len(loader), max_steps) if max_steps else len(loader)
    bar = log.progress(unwrap_worker_errors(loader), total=total, desc=f"epoch {epoch + 1} train", leave=False)
    for images, targets, _ in bar:
        inputs, targets = policy.inputs(images), targets.to(policy.device, non_blocking=True)
        with policy.autocast():
            logits = model(inputs)
        loss = loss_fn(logits.float(), targets)
        # All ranks agree before backward, so a NaN on one rank stops every rank instead of hanging DDP.
        if any_rank(not torch.isfinite(loss).item(), ctx):
            raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}, step {steps + 1} "
                                     f"(global step {global_step + 1}); lower --lr, check the data, or try --amp off")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if step_scheduler is not None:
            step_scheduler()
        loss_sum += loss.detach()
        steps += 1
        global_step += 1
        images_seen += images.shape[0]
        if global_step % log_every == 0:
            log.add_scalar("train/loss", loss.item(), global_step)
            for group in optimizer.param_groups:
                log.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], global_step)
        if hasattr(bar, "set_postfix") and steps % 5 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_seen * ctx.world_size / (time.perf_counter() - started):.1f}")
        if max_steps and steps >= max_steps:
            break
    seconds = time.perf_counter() - started
    return {"loss": (loss_sum / max(steps, 1)).item(), "steps": steps, "global_step": global_step,
            "images_per_s": images_seen * ctx.world_size / max(seconds, 1e-9), "seconds": seconds}


@torch.no_grad()
def predict(model: nn.Module, loader: Any, ctx: DistContext, policy: DevicePolicy, loss_fn: nn.Module | None = None,
            desc: str = "predict", log: RankZero | None = None,
            views: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> dict[str, Any]:
    """Probabilities for every sample of loader.dataset exactly once (sampler padding dropped), on every rank.

    `views` (test-time augmentation) maps a batch to several batches; their probabilities are averaged.
    Returns `probabilities` and `labels` ([N, C] numpy, in dataset order), the mean `loss` when a loss is
    given (on the view-averaged logits), and `images_per_s`.
    """
    model.eval()
    positions, logits_all, labels_all = [], [], []
    started = time.perf_counter()
    batches = unwrap_worker_errors(loader)
    iterable = log.progress(batches, total=len(loader), desc=desc, leave=False) if log is not None else batches
    for images, targets, index in iterable:
        inputs = policy.inputs(images)
        with policy.autocast():
            if views is None:
                logits = model(inputs).float()
            else:  # average probabilities over the views, kept in logit form for one code path
                probabilities = torch.stack([torch.sigmoid(model(view).float()) for view in views(inputs)]).mean(0)
                logits = torch.logit(probabilities.clamp(1e-7, 1 - 1e-7))
        positions.append(index)
        logits_all.append(logits.float().cpu())
        labels_all.append(targets)
    seconds = time.perf_counter() - started
    total = len(loader.dataset)
    width = logits_all[0].shape[1] if logits_all else 0
    local_index = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)
    local_rows = torch.cat([torch.cat(logits_all), torch.cat(labels_all)], dim=1) if logits_all else torch.zeros(0, 2 * width)
    _, rows = gather_predictions(local_index, local_rows, total, ctx)
    logits, labels = rows[:, :width], rows[:, width:]
    result: dict[str, Any] = {"probabilities": 1.0 / (1.0 + np.exp(-logits.astype(np.float64))),
                              "labels": labels.astype(np.float32), "images_per_s": total / max(seconds, 1e-9)}
    if loss_fn is not None:
        result["loss"] = float(loss_fn(torch.from_numpy(logits).float(), torch.from_numpy(labels).float()))
    return result

