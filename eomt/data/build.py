"""Datasets and loaders from a config.

Training data is a single stream of sample positions: position p is sample perm_e[p mod N] of
epoch e = p // N, with perm_e a permutation seeded by (seed, e), augmented under an RNG seeded
by (seed, p). Optimizer step t with A accumulation steps on W processes of b images each reads
positions t*A*W*b onward, so a run resumed at step t sees exactly the data an uninterrupted run
would, whatever the number of loader workers.
"""

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from eomt.data.layouts import DATASET_LAYOUTS
from eomt.data.transforms import TrainTransforms, collate


def build_dataset(cfg, split: str, train: bool) -> Dataset:
    name = cfg.dataset.name
    if name not in DATASET_LAYOUTS:
        raise ValueError(f"dataset.name '{name}' is not one of {sorted(DATASET_LAYOUTS)}")
    transforms = None
    if train:
        transforms = TrainTransforms(
            crop_size=tuple(cfg.input.image_size),
            scale_range=tuple(cfg.input.scale_range),
            color_jitter=cfg.input.color_jitter,
        )
    return DATASET_LAYOUTS[name](Path(cfg.dataset.root), split, transforms)


class SeededStream(Dataset):
    """Maps a stream position to (epoch, sample), augmented under an RNG seeded by the position."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self._epoch_order = (-1, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        epoch, offset = divmod(position, len(self.dataset))
        if self._epoch_order[0] != epoch:
            order = torch.randperm(len(self.dataset), generator=_generator(self.seed, epoch))
            self._epoch_order = (epoch, order)
        order = self._epoch_order[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_mix(self.seed, position))
            return self.dataset[int(order[offset])]


def _mix(seed: int, value: int) -> int:
    return (seed * 1_000_003 + value) % (2**63)


def _generator(seed: int, value: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(seed, value))


class StreamSampler(Sampler):
    """Endless stream positions for one process, from optimizer step `start_iter` on."""

    def __init__(self, start_iter: int, accumulation: int, batch_per_device: int, rank, world):
        self.start_iter, self.accumulation = start_iter, accumulation
        self.batch, self.rank, self.world = batch_per_device, rank, world

    def __iter__(self):
        chunk = self.world * self.batch
        micro_step = self.start_iter * self.accumulation
        while True:
            first = micro_step * chunk + self.rank * self.batch
            yield from range(first, first + self.batch)
            micro_step += 1


def build_train_loader(cfg, start_iter: int, accumulation: int, rank: int, world: int):
    """Batches (images (b, 3, H, W), targets) of this process, from `start_iter` on, endless."""
    dataset = SeededStream(build_dataset(cfg, cfg.dataset.train_split, train=True), cfg.seed)
    b = cfg.solver.batch_size_per_device
    return DataLoader(
        dataset,
        batch_size=b,
        sampler=StreamSampler(start_iter, accumulation, b, rank, world),
        num_workers=cfg.dataloader.num_workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.dataloader.num_workers > 0,
        # A loader of its own draws worker seeds without touching the global RNG.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


class ShardSampler(Sampler):
    """Every `world`-th index from `rank`: each image on exactly one process, none repeated."""

    def __init__(self, size: int, rank: int, world: int):
        self.indices = range(rank, size, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_test_loader(cfg, dataset: Dataset, rank: int = 0, world: int = 1) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=cfg.test.batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=cfg.dataloader.num_workers,
        collate_fn=collate,
    )
