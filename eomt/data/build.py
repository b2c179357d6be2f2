"""Datasets and loaders from a config.

Training data is a single stream of sample positions: position p is sample perm_e[p mod N] of
epoch e = p // N, with perm_e a permutation seeded by (seed, e), augmented under an RNG seeded
by (seed, p). Optimizer step t with A accumulation steps on W processes of b images each reads
positions t*A*W*b onward, so a run resumed at step t sees exactly the data an uninterrupted run
would, whatever the number of loader workers.

cfg.dataset.bad_samples (stop | skip) is the policy for samples that cannot be read (see
eomt.data.bad_samples): with skip, a training position whose sample is bad gets the next sample
of the epoch's order instead (so it depends only on the seed and the position), an evaluation
image is left out, and the loader's `skipped` lists them.
"""

from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset, Sampler

from eomt.data.bad_samples import (
    REPLACED_KEY,
    BadSampleError,
    SampleLoader,
    SkipBadSamples,
    check_policy,
)
from eomt.data.files import DataPath, resolve_path
from eomt.data.layouts import DATASET_LAYOUTS, check_dataset
from eomt.data.transforms import TrainTransforms
from eomt.data.video import ClipSampler, ClipTransforms


def build_dataset(cfg, train: bool) -> Dataset:
    """The training split (augmented) or the evaluation split of the config's dataset: the
    layout `dataset.name` under `dataset.root`, with the files set in `dataset.train` or
    `dataset.test` (and `dataset.classes`) used instead of the layout's own places."""
    d = cfg.dataset
    if d.name not in DATASET_LAYOUTS:
        raise ValueError(f"dataset.name '{d.name}' is not one of {sorted(DATASET_LAYOUTS)}")
    layout = DATASET_LAYOUTS[d.name]
    transforms = None
    options = layout_options(cfg)
    if train:
        # A clip takes one draw of the image augmentation for all its frames.
        augment = ClipTransforms if layout.video else TrainTransforms
        transforms = augment(
            crop_size=tuple(cfg.input.image_size),
            scale_range=tuple(cfg.input.scale_range),
            color_jitter=cfg.input.color_jitter,
        )
    if layout.video:  # training: clips of input.num_frames; evaluation: whole videos
        i = cfg.input
        options["clip_sampler"] = ClipSampler(i.num_frames, i.frame_range) if train else None
    split = d.train_split if train else d.test_split
    given = own_files(cfg, train)
    policy = check_policy(d.bad_samples)
    return layout(Path(d.root), split, transforms, policy, given, **options)


def layout_options(cfg) -> dict:
    """The cfg.dataset values the layout's reader takes (`Layout.options`)."""
    return {key: cfg.dataset[key] for key in DATASET_LAYOUTS[cfg.dataset.name].options}


def own_files(cfg, train: bool) -> dict[str, DataPath]:
    """The pieces of a split given in the config, each checked to exist; errors name the key."""
    d = cfg.dataset
    layout = DATASET_LAYOUTS[d.name]
    section = "train" if train else "test"
    keys = {f"dataset.{section}.{piece}": piece for piece in d[section]}
    keys["dataset.classes"] = "classes"
    given = {}
    for key, piece in keys.items():
        value = OmegaConf.select(cfg, key)
        if not value:
            if layout.places is None and piece in layout.pieces:
                needed = ", ".join(k for k, p in keys.items() if p in layout.pieces)
                raise ValueError(
                    f"{key} is not set: dataset.name {d.name} reads your own files ({needed})"
                )
            continue
        if piece not in layout.pieces:
            raise ValueError(
                f"{key}: dataset.name {d.name} reads no {piece} (it reads "
                f"{', '.join(layout.pieces)})"
            )
        path = resolve_path(Path(d.root) / value)
        if not path.exists():
            raise FileNotFoundError(f"{key}: {path} not found")
        given[piece] = path
    return given


def check_config_dataset(cfg, num_samples: int = 2, report=print) -> bool:
    """`check_dataset` for the training and evaluation splits of a config, own files included."""
    d = cfg.dataset
    given = {}
    for train in (True, False):
        try:
            given[d.train_split if train else d.test_split] = own_files(cfg, train)
        except (FileNotFoundError, ValueError) as error:
            report(f"FAILED: {error}")
            return False
    return check_dataset(
        d.name, d.root, tuple(given), num_samples, report, given, layout_options(cfg)
    )


class SeededStream(Dataset):
    """Maps a stream position to (epoch, sample), augmented under an RNG seeded by the position.

    With bad_samples="skip", a sample raising BadSampleError is replaced by the next one of the
    epoch's order (wrapping around), augmented under the same position's RNG; the target of
    the sample returned lists the messages of those it replaces under REPLACED_KEY. If no
    sample of the dataset can be read, BadSampleError says so.
    """

    def __init__(self, dataset: Dataset, seed: int, bad_samples: str = "stop"):
        self.dataset, self.seed = dataset, seed
        self.bad_samples = check_policy(bad_samples)
        self._epoch_order = (-1, None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        size = len(self.dataset)
        epoch, offset = divmod(position, size)
        if self._epoch_order[0] != epoch:
            order = torch.randperm(size, generator=_generator(self.seed, epoch))
            self._epoch_order = (epoch, order)
        order = self._epoch_order[1]
        replaced = []
        for step in range(size):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix(self.seed, position))
                try:
                    image, target = self.dataset[int(order[(offset + step) % size])]
                except BadSampleError as error:
                    if self.bad_samples == "stop":
                        raise
                    replaced.append(str(error))
                    continue
            if replaced:
                target[REPLACED_KEY] = replaced
            return image, target
        raise BadSampleError(
            f"none of the {size} samples of the training set can be read "
            f"(dataset.bad_samples=skip); the first: {replaced[0]}"
        )


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


def build_train_loader(
    cfg, start_iter: int, accumulation: int, rank: int, world: int
) -> SampleLoader:
    """Batches (images [b x (3, H, W)], targets) of this process, from `start_iter` on, endless.

    `loader.skipped` lists the bad samples replaced so far (dataset.bad_samples=skip), one
    entry per replacement, as seen by this process.
    """
    dataset = SeededStream(
        build_dataset(cfg, train=True),
        cfg.seed,
        cfg.dataset.bad_samples,
    )
    b = cfg.solver.batch_size_per_device
    return SampleLoader(
        dataset,
        batch_size=b,
        sampler=StreamSampler(start_iter, accumulation, b, rank, world),
        num_workers=cfg.dataloader.num_workers,
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


def build_test_loader(cfg, dataset: Dataset, rank: int = 0, world: int = 1) -> SampleLoader:
    """Batches (images, targets) of this process's share of `dataset`, each image once.

    With dataset.bad_samples=skip, images that cannot be read are left out: after a pass,
    `loader.skipped` holds one message per image left out by this process (sum it over
    processes); a batch left empty is not yielded.
    """
    if check_policy(cfg.dataset.bad_samples) == "skip":
        dataset = SkipBadSamples(dataset)
    return SampleLoader(
        dataset,
        per_pass=True,
        batch_size=cfg.test.batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=cfg.dataloader.num_workers,
    )
