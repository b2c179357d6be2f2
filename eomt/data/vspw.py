"""Reader for video semantic segmentation in the VSPW format (per-frame label PNGs)."""

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from eomt.data.bad_samples import BadSampleError, MissingSampleFileError, defer_or_raise
from eomt.data.files import DataPath, resolve_path
from eomt.data.images import IMAGE_SUFFIXES, open_image_file
from eomt.data.video import (
    VSPW_CATEGORIES,
    ClipSampler,
    VideoDataset,
    load_frames,
    things_first,
    track_target,
)

IGNORED_VALUES = (0, 255)


class VSPWDataset(VideoDataset):
    """VSPW: `data_dir/<video>/origin/<frame>.jpg` with labels `data_dir/<video>/mask/<frame>.png`,
    the videos listed one per line in `split_file` (VSPW's train.txt, val.txt).

    A label PNG value v is category id v - 1; 0 and 255 are ignored (the authors'
    `_vspw_preprocess`). `categories` ({id, name, isthing}) default to VSPW's 124; labels are
    contiguous in the authors' order, the things by id, then the stuff by id. As the authors'
    semantic mapper, a target holds one track per class present in the clip (or the whole
    video): `ids` are the contiguous labels. Single-channel (gray or palette) PNGs are read as
    stored; of an RGB PNG the first channel is read, as the authors' mapper does.

    Frames and labels are paired by file stem in sorted order. A video without a `mask` folder
    (the test split) is unlabelled: its targets are empty, and a training clip of it is an
    error. The label map defines the geometry (see `load_image`).

    Errors: a missing split file or data folder when built; with bad_samples="stop" also when
    built, with "skip" when the video is read, a missing video or origin folder
    (MissingSampleFileError) or frames and labels that do not pair (BadSampleError naming the
    video and the counts); when read, a label value that is not a category id + 1, or frames
    of different sizes.
    """

    def __init__(
        self,
        data_dir: "str | Path | DataPath",
        split_file: "str | Path | DataPath",
        categories: Sequence[dict] | None = None,
        clip_sampler: ClipSampler | None = None,
        transforms: Callable | None = None,
        bad_samples: str = "stop",
    ):
        super().__init__(clip_sampler, transforms)
        self.data_dir = resolve_path(data_dir)
        self.split_file = resolve_path(split_file)
        self.categories = things_first(VSPW_CATEGORIES if categories is None else categories)
        self.categories_source = "VSPW_CATEGORIES" if categories is None else "the given categories"
        ids = [c["id"] for c in self.categories]
        if min(ids) < 0 or max(ids) > 253 or len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be distinct and in 0..253, got {sorted(ids)}")
        # label PNG value -> contiguous label (255: ignored or unknown)
        self.label_of_value = np.full(256, 255, dtype=np.int64)
        for label, category in enumerate(self.categories):
            self.label_of_value[category["id"] + 1] = label
        self.known_value = self.label_of_value != 255
        self.known_value[list(IGNORED_VALUES)] = True

        if not self.split_file.is_file():
            raise FileNotFoundError(f"Split file not found: {self.split_file}")
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"Data folder not found: {self.data_dir}")
        names = [line.strip() for line in self.split_file.read_bytes().decode().splitlines()]
        self.videos, problems = [], {}
        for name in filter(None, names):
            index = len(self.videos)
            video = {"video_id": name, "length": 0, "file_names": [], "label_names": None}
            self.videos.append(video)
            origin, mask = self.data_dir / name / "origin", self.data_dir / name / "mask"
            if not origin.is_dir():
                problems[index] = MissingSampleFileError(
                    f"{self.split_file}: video {name}: frame folder not found: {origin}", origin
                )
                continue
            frames = [f for f in origin.files() if f.lower().endswith(IMAGE_SUFFIXES)]
            video.update(file_names=frames, length=len(frames))
            if not frames:
                problems[index] = MissingSampleFileError(f"{origin}: no frames", origin)
            if not mask.is_dir():
                continue
            labels = mask.files(".png")
            stems = [f.rsplit(".", 1)[0] for f in frames]
            if [f[: -len(".png")] for f in labels] != stems:
                problems[index] = BadSampleError(
                    f"{self.data_dir / name}: {len(frames)} frames in origin/ and "
                    f"{len(labels)} label PNGs in mask/ do not pair by name "
                    f"(first frames {stems[:2]}, first labels {labels[:2]})",
                    mask,
                )
            video["label_names"] = labels
        if not self.videos:
            raise ValueError(f"{self.split_file}: lists no video")
        self.bad_entries = defer_or_raise(problems, bad_samples)

    def read_label_map(self, path: DataPath) -> np.ndarray:
        """Contiguous int64 label map (H, W) of one label PNG, 255 where ignored."""
        with open_image_file(path, "Label file") as png:
            mode = png.mode
            raw = np.asarray(png)
        if raw.ndim == 3 and mode in ("RGB", "RGBA"):
            raw = raw[..., 0]
        if raw.ndim != 2 or raw.dtype != np.uint8:
            raise BadSampleError(f"{path}: expected an 8-bit label PNG, got mode {mode}", path)
        known = self.known_value[raw]
        if not known.all():
            raise BadSampleError(
                f"{path}: label value {raw[~known][0]} is not a category id + 1 "
                f"(values 1..{max(c['id'] for c in self.categories) + 1}, 0 and 255 ignored)",
                path,
            )
        return self.label_of_value[raw]

    def _read(self, video: dict, frame_indices: list[int]) -> tuple[torch.Tensor, dict]:
        name = video["video_id"]
        if video["label_names"] is None and self.clip_sampler is not None:
            raise MissingSampleFileError(
                f"{self.data_dir / name}: no mask folder; a training clip needs labels",
                self.data_dir / name / "mask",
            )
        file_names = [video["file_names"][i] for i in frame_indices]
        size, label_maps = None, None
        if video["label_names"] is not None:
            mask_dir = self.data_dir / name / "mask"
            label_maps = self.read_maps(
                frame_indices,
                lambda frame: mask_dir / video["label_names"][frame],
                self.read_label_map,
            )
            size = label_maps.shape[1:]
            geometry = [str(mask_dir / video["label_names"][frame]) for frame in frame_indices]
        else:  # unlabelled: the first frame's size
            geometry = f"the first frame of {self.data_dir / name / 'origin'}"
        origin = self.data_dir / name / "origin"
        frames = load_frames([origin / file_name for file_name in file_names], size, geometry)
        shape = (len(frame_indices), *frames.shape[-2:])
        if label_maps is None:
            return frames, {**track_target([], [], [], [], shape), "file_names": file_names}
        classes = [int(c) for c in np.unique(label_maps) if c != 255]
        masks = [label_maps == c for c in classes]
        target = track_target(masks, classes, classes, [False] * len(classes), shape)
        target["file_names"] = file_names
        return frames, target
