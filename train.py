"""Train DenseNet121 + head on NIH ChestX-ray14 (or the built-in synthetic set) with two-phase fine-tuning.

    python train.py                                            # demo: synthetic data, ~3 min on 2 CPU cores
    python train.py --data-dir /data/nih                       # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py --data-dir /data/nih  # DDP on 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 train.py --data-dir /data/nih
    python train.py --resume runs/20261201-120000              # continue exactly where it stopped, in that folder
    python train.py --data-dir /data/nih --out runs/a --resume auto   # same command for the first start and restarts
    torchrun --max-restarts=3 --nproc_per_node=8 train.py --data-dir /data/nih --out runs/a   # survives lost workers

Phase 1 (--warmup-epochs): trunk frozen, head trains. Phase 2: the last --unfreeze dense blocks train too,
at --lr * --trunk-lr-mult. Checkpoints (last.pt, best.pt), config.yaml, metrics.jsonl and TensorBoard logs go to --out (default: runs/<torchrun
rendezvous id> under torchrun, else runs/<timestamp>). SIGTERM or SIGUSR1 stops every rank after its current step;
rank 0 saves last.pt with the position inside the epoch and the process exits with status 75 (PREEMPTED_EXIT_CODE).
A group restarted by torchrun (TORCHELASTIC_RESTART_COUNT > 0) resumes from the run directory's last.pt by itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from cxr.checkpoint import LAST_NAME, load_checkpoint, resolve_checkpoint_path
from cxr.config import Config, build_parser, config_for_resume, config_from_args
from cxr.distributed import cleanup_distributed, setup_distributed
from cxr.errors import ConfigError, run_main
from cxr.rundir import default_run_dir, open_run_dir
from cxr.seeding import seed_everything
from cxr.trainer import DIVERGED_LOSS, fit, load_inputs


def main(argv: list[str] | None = None) -> int:
    return run_main(lambda: train(argv))


def resolve_resume(args) -> None:
    """--resume auto (or a torchrun restart without --resume): the run directory's last.pt if any, else fresh."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if args.resume != "auto" and not (restarted and not args.resume):
        return
    args.out = args.out or default_run_dir()
    if not args.out:
        raise ConfigError("--resume auto needs the run directory: pass --out DIR (or launch with torchrun, whose "
                          "rendezvous id names runs/<id>)")
    args.resume = args.out if (Path(args.out) / LAST_NAME).is_file() else None


def train(argv: list[str] | None) -> int:
    args = build_parser(__doc__).parse_args(argv)
    resolve_resume(args)
    resumed = None
    if args.resume:
        checkpoint_path = resolve_checkpoint_path(args.resume)
        resumed = load_checkpoint(checkpoint_path)
        config = config_for_resume(args, resumed["config"], run_dir=str(checkpoint_path.parent))
    else:
        args.out = args.out or default_run_dir() or None
        config = config_from_args(args)
    ctx = setup_distributed(config.device)
    try:
        return run(config, resumed, ctx)
    finally:
        cleanup_distributed(ctx)


def run(config: Config, resumed: dict | None, ctx) -> int:
    seed_everything(config.seed, ctx.rank)
    inputs = load_inputs(config, ctx)  # data and cache are checked before a run directory is created
    run_dir = open_run_dir(config, ctx, resuming=resumed is not None)
    try:
        code = fit(config, resumed, ctx, run_dir.path, inputs)
        if code == 0 and ctx.is_main:
            print_next_steps(run_dir.path, load_checkpoint(run_dir.path / LAST_NAME), config)
        return code
    finally:
        run_dir.close()


def print_next_steps(run_dir: Path, state: dict, config: Config) -> None:
    best = run_dir / "best.pt"
    metric = "mean AUROC" if state["best_metric"] >= 0 else "score (minus the loss: AUROC undefined on this split)"
    print(f"\ndone: best validation {metric} {state['best_metric']:.4f} at epoch {state['best_epoch'] + 1}")
    if state["history"] and state["history"][-1]["train_loss"] > DIVERGED_LOSS:
        print("WARNING: training diverged (see the loss above); these checkpoints are not worth evaluating")
    print(f"run directory:   {run_dir}")
    print(f"best checkpoint: {best}")
    print(f"metrics:         {run_dir / 'metrics.jsonl'} (one JSON line per epoch)")
    print(f"TensorBoard:     tensorboard --logdir {run_dir / 'tensorboard'}")
    print("next:")
    print(f"  python evaluate.py --checkpoint {best}")
    print(f"  python explain.py --checkpoint {best} --data-dir {config.data_dir or '<demo data>'} --split test")


if __name__ == "__main__":
    sys.exit(main())
