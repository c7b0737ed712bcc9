"""Every random number of a run is a function of (seed, rank, epoch): the formulas live here, once.

    seed_everything(config.seed, ctx.rank)             # at start: python, numpy, torch
    loader.generator.manual_seed(loader_seed(seed, rank))
    start_seed = epoch_seed(seed, rank, epoch)         # shuffle order, worker seeds, augmentation, dropout
    DataLoader(..., worker_init_fn=seed_worker)        # each worker derives its generators from torch's seed
    dataset.reseed(sample_seed(seed, epoch, position))  # augmentation: per sample (persistent workers)
    torch.manual_seed(step_seed(seed, rank, global_step))  # dropout: per optimizer step

Exact resume therefore needs no saved RNG state: re-seeding from (seed, rank, epoch) at the start of an
epoch, from (seed, epoch, position) for each sample's augmentation and from (seed, rank, step) for each
step's dropout reproduces the run whatever happened before (resume at an epoch boundary or in the middle of
an epoch, another number of workers, persistent workers, a restart).
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (all devices) with seed + rank; return the seed used."""
    # The rank offset gives each rank different augmentations; DistributedSampler shards by its own seed.
    effective = int(seed) + int(rank)
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)  # also seeds every CUDA device
    return effective


def loader_seed(seed: int, rank: int) -> int:
    """The DataLoader generator's seed of one rank."""
    return int(seed) * 1000 + int(rank)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one rank's epoch: its shuffle, worker seeds, augmentation and dropout derive from it."""
    return loader_seed(seed, rank) * 1000 + int(epoch)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample in one epoch: independent of rank, worker and batch (a 63-bit mix)."""
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + int(position) * 0x94D049BB133111EB)
    mixed &= 2**64 - 1
    mixed ^= mixed >> 31  # splitmix64-style finalizer: neighbouring positions get unrelated seeds
    mixed = (mixed * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (mixed ^ (mixed >> 32)) % 2**32


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The torch seed (dropout) of one rank's optimizer step: a mid-epoch resume replays the same masks."""
    return epoch_seed(seed, rank, 0) * 1_000_003 + int(global_step)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive every generator of the worker from its torch seed (set per epoch)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = torch.utils.data.get_worker_info().dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
