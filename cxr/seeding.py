"""Every random number of a run is a function of (seed, rank, epoch): the formulas live here, once.

    seed_everything(config.seed, ctx.rank)             # at start: python, numpy, torch
    loader.generator.manual_seed(loader_seed(seed, rank))
    start_seed = epoch_seed(seed, rank, epoch)         # shuffle order, worker seeds, augmentation, dropout
    DataLoader(..., worker_init_fn=seed_worker)        # each worker derives its generators from torch's seed

Exact resume therefore needs no saved RNG state: re-seeding from (seed, rank, epoch) at the start of an
epoch reproduces the epoch whatever happened before it (resume, another number of workers, a restart).
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


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: derive every generator of the worker from its torch seed (set per epoch)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = torch.utils.data.get_worker_info().dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
