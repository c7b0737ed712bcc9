"""The training step loop and exact distributed prediction; everything arrives as arguments, plain data returns.

    stats = train_one_epoch(model, loss_fn, optimizer, loader, ctx, log, policy, epoch=0, global_step=0)
    result = predict(model, loader, ctx, policy, loss_fn)     # every sample once, in dataset order

The step loop never waits for the device on its own: the non-finite-loss flag lives on the device and is
checked, together with a stop request (SIGTERM/SIGUSR1, see cxr.preemption), by one small all-reduce every
`log_every` optimizer steps and at the end of the epoch; loss values for logs are copied then. A run that
stops early returns `interrupted=True` and its `position` inside the epoch, for a resumable checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from cxr.data import unwrap_worker_errors
from cxr.device import DevicePolicy
from cxr.distributed import DistContext, RankZero, all_reduce_sum, gather_predictions, min_across_ranks
from cxr.errors import CxrError
from cxr.seeding import step_seed

NO_BAD_STEP = 2**62  # the device-side "first non-finite step" while every loss is finite


class NonFiniteLossError(CxrError, RuntimeError):
    """The loss became NaN/inf on some rank; every rank raises it together."""


def timed_batches(loader: Iterable, waits: list[float]) -> Iterator[Any]:
    """Iterate `loader`, appending to `waits` the seconds spent waiting for each batch (the one loader loop)."""
    iterator = iter(loader)
    while True:
        asked = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            return
        waits.append(time.perf_counter() - asked)
        yield batch


def no_sync(model: nn.Module) -> Any:
    """DDP's no_sync() (also under torch.compile): gradients accumulate locally, no all-reduce."""
    inner = getattr(model, "_orig_mod", model)
    return inner.no_sync() if isinstance(inner, nn.parallel.DistributedDataParallel) else nullcontext()


def _agree(bad_step: torch.Tensor, stop: bool, ctx: DistContext) -> tuple[int, bool]:
    """One sync: the first non-finite step of any rank (NO_BAD_STEP if none) and whether any rank must stop."""
    flags = torch.stack([bad_step, torch.tensor(0 if not stop else -1, device=bad_step.device)])
    flags = min_across_ranks(flags, ctx)
    values = flags.tolist()
    return int(values[0]), values[1] < 0


def train_one_epoch(model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, loader: Any,
                    ctx: DistContext, log: RankZero, policy: DevicePolicy, *, epoch: int, global_step: int,
                    scaler: torch.amp.GradScaler | None = None, step_scheduler: Callable[[], None] | None = None,
                    max_steps: int = 0, log_every: int = 20, grad_clip: float = 0.0, accum_steps: int = 1,
                    seed: int | None = None, stop_requested: Callable[[], bool] | None = None,
                    position: dict | None = None) -> dict[str, Any]:
    """One pass over `loader` (K = accum_steps micro-batches per optimizer step); returns plain statistics.

    `seed` re-seeds torch (dropout) per optimizer step from (seed, rank, global step); `position` continues a
    partial epoch (the loader already skips its consumed batches); `stop_requested` is polled on this rank and
    agreed on across ranks at each check. Returns loss (mean over ranks and micro-batches), steps, global_step,
    images_per_s, seconds, data_wait_s, interrupted (stopped inside the epoch), stop_requested (also when the
    request came at its end) and `position` (to store when interrupted).
    """
    model.train()
    done = dict(position or {})
    batches, steps, images_seen = done.get("batches", 0), done.get("steps", 0), done.get("images", 0)
    loss_sum = torch.tensor(float(done.get("loss_sum", 0.0)), device=policy.device)
    loss_count = torch.tensor(float(done.get("loss_count", 0.0)), device=policy.device)
    bad_step = torch.tensor(NO_BAD_STEP, device=policy.device)
    waits: list[float] = []
    pending: list[tuple[int, torch.Tensor]] = []
    started, earlier_seconds = time.perf_counter(), float(done.get("seconds", 0.0))
    accum = max(1, accum_steps)
    total = len(loader) // accum
    if max_steps:
        total = max(0, min(total, max_steps - steps))
    bar = log.progress(timed_batches(unwrap_worker_errors(loader), waits), total=total, desc=f"epoch {epoch + 1} train", leave=False)
    micro, interrupted = 0, False
    for images, targets, _ in bar:
        if micro == 0:
            if seed is not None:
                torch.manual_seed(step_seed(seed, ctx.rank, global_step))
            optimizer.zero_grad(set_to_none=True)
        inputs, targets = policy.inputs(images), targets.to(policy.device, non_blocking=True)
        with no_sync(model) if micro < accum - 1 else nullcontext():
            with policy.autocast():
                logits = model(inputs)
            loss = loss_fn(logits.float(), targets)
            scaled = loss / accum if accum > 1 else loss
            (scaler.scale(scaled) if scaler is not None and scaler.is_enabled() else scaled).backward()
        detached = loss.detach()
        bad_step = torch.where(torch.isfinite(detached), bad_step, torch.clamp(bad_step, max=steps + 1))
        loss_sum += detached
        loss_count += 1
        batches += 1
        images_seen += images.shape[0]
        micro = (micro + 1) % accum
        if micro:
            continue
        if scaler is not None and scaler.is_enabled():
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if step_scheduler is not None:
            step_scheduler()
        steps += 1
        global_step += 1
        if global_step % log_every == 0:  # queued now, read after the next sync: no wait here
            pending.append((global_step, detached.to("cpu", non_blocking=True)))
        stop = bool(stop_requested()) if stop_requested is not None else False
        last = bool(max_steps) and steps >= max_steps
        # A stop request is free to read in one process; under DDP the ranks agree only at the checks.
        if steps % log_every == 0 or last or (stop and not ctx.distributed):
            first_bad, stop = _agree(bad_step, stop, ctx)
            _raise_if_bad(first_bad, epoch, global_step - steps)
            _flush(pending, optimizer, log, bar, images_seen * ctx.world_size / max(time.perf_counter() - started, 1e-9))
            if stop and not last:
                interrupted = True
                break
        if last:
            break
    first_bad, stop = _agree(bad_step, bool(stop_requested()) if stop_requested is not None else False, ctx)
    _raise_if_bad(first_bad, epoch, global_step - steps)
    _flush(pending, optimizer, log, bar, 0.0)
    seconds = time.perf_counter() - started
    totals = all_reduce_sum(torch.stack([loss_sum, loss_count]), ctx).tolist()
    wait_seconds = float(all_reduce_sum(torch.tensor([sum(waits)], dtype=torch.float64), ctx).item()) / ctx.world_size
    # Ranks other than 0 restart their partial sums at zero on resume; rank 0 carries the all-reduced totals.
    here = {"batches": batches, "steps": steps, "images": images_seen, "seconds": earlier_seconds + seconds,
            "loss_sum": totals[0] if ctx.is_main else 0.0, "loss_count": totals[1] if ctx.is_main else 0.0}
    this_run_images = images_seen - done.get("images", 0)
    return {"loss": totals[0] / max(totals[1], 1.0), "steps": steps, "global_step": global_step,
            "images_per_s": this_run_images * ctx.world_size / max(seconds, 1e-9), "seconds": earlier_seconds + seconds,
            "data_wait_s": wait_seconds, "data_wait_fraction": wait_seconds / max(seconds, 1e-9),
            "interrupted": interrupted, "stop_requested": interrupted or stop, "position": here}


def _raise_if_bad(first_bad: int, epoch: int, first_global: int) -> None:
    if first_bad != NO_BAD_STEP:
        raise NonFiniteLossError(f"non-finite training loss at epoch {epoch + 1}, step {first_bad} "
                                 f"(global step {first_global + first_bad}); lower --lr, check the data, or try --amp off; "
                                 "no checkpoint of this epoch was written")


def _flush(pending: list[tuple[int, torch.Tensor]], optimizer: torch.optim.Optimizer, log: RankZero, bar: Any,
           images_per_s: float) -> None:
    """Write the loss values copied since the last sync (the sync has made them ready) and the learning rates."""
    for step, value in pending:
        log.add_scalar("train/loss", float(value), step)
        for group in optimizer.param_groups:
            log.add_scalar(f"lr/{group.get('name', 'group')}", group["lr"], step)
    if pending and hasattr(bar, "set_postfix") and images_per_s:
        bar.set_postfix(loss=f"{float(pending[-1][1]):.4f}", img_s=f"{images_per_s:.1f}")
    pending.clear()


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
        logits_all.append(logits.float().to("cpu", non_blocking=True))
        labels_all.append(targets)
    if policy.device.type == "cuda":
        torch.cuda.current_stream(policy.device).synchronize()  # the non-blocking copies above have landed
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
