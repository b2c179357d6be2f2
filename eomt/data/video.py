"""Video clips in the shared (frames, target) convention: clip sampling, clip augmentation,
collation and the base of the video readers (`YTVISDataset`, `VIPSegDataset`, `VSPWDataset`).

An item is `(frames, target)`: `frames` a uint8 tensor (T, 3, H, W), `target` a dict with

- `masks` bool (N, T, H, W): one row per track; a track absent in a frame is all False there;
- `labels` int64 (N,): contiguous class indices; `ids` int64 (N,): track ids of the dataset
  (stable across the frames of a video); `is_crowd` bool (N,);
- `video_id`, `frame_indices` (the frames' positions in the video), `file_names` (of those
  frames, as the annotations name them), `orig_size` (H, W of the video), `length` (its
  number of frames).

A reader built with a `ClipSampler` returns a training clip of `num_frames` frames; without
one, the whole video (evaluation). Randomness (the clip's frames, the augmentation) comes from
torch's global RNG unless a generator is given, so that `eomt.data.build.SeededStream`, which
seeds it per stream position, makes a clip reproducible.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from eomt.data.bad_samples import BadSampleError
from eomt.data.categories import distinct_color
from eomt.data.files import DataPath
from eomt.data.images import load_image_uint8
from eomt.data.transforms import TrainTransforms

# The authors' VidEoMT configs (configs/*/videomt/*.yaml): SAMPLING_FRAME_NUM 5,
# SAMPLING_FRAME_RANGE 2, for YouTube-VIS, OVIS, VIPSeg and VSPW alike.
DEFAULT_NUM_FRAMES = 5
DEFAULT_FRAME_RANGE = 2

# The 124 classes of VSPW, shared by VIPSeg, by dataset id (0..123): a VSPW label PNG holds
# id + 1 (0 and 255: ignored). The order and thing/stuff split of the authors' class lists
# (videomt/data_video/datasets/vss.py and vps.py).
VSPW_NAMES = (
    "wall", "ceiling", "door", "stair", "ladder", "escalator", "Playground_slide",
    "handrail_or_fence", "window", "rail", "goal", "pillar", "pole", "floor", "ground", "grass",
    "sand", "athletic_field", "road", "path", "crosswalk", "building", "house", "bridge",
    "tower", "windmill", "well_or_well_lid", "other_construction", "sky", "mountain", "stone",
    "wood", "ice", "snowfield", "grandstand", "sea", "river", "lake", "waterfall", "water",
    "billboard_or_Bulletin_Board", "sculpture", "pipeline", "flag", "parasol_or_umbrella",
    "cushion_or_carpet", "tent", "roadblock", "car", "bus", "truck", "bicycle", "motorcycle",
    "wheeled_machine", "ship_or_boat", "raft", "airplane", "tyre", "traffic_light", "lamp",
    "person", "cat", "dog", "horse", "cattle", "other_animal", "tree", "flower", "other_plant",
    "toy", "ball_net", "backboard", "skateboard", "bat", "ball",
    "cupboard_or_showcase_or_storage_rack", "box", "traveling_case_or_trolley_case", "basket",
    "bag_or_package", "trash_can", "cage", "plate", "tub_or_bowl_or_pot", "bottle_or_cup",
    "barrel", "fishbowl", "bed", "pillow", "table_or_desk", "chair_or_seat", "bench", "sofa",
    "shelf", "bathtub", "gun", "commode", "roaster", "other_machine", "refrigerator",
    "washing_machine", "Microwave_oven", "fan", "curtain", "textiles", "clothes",
    "painting_or_poster", "mirror", "flower_pot_or_vase", "clock", "book", "tool", "blackboard",
    "tissue", "screen_or_television", "computer", "printer", "Mobile_phone", "keyboard",
    "other_electronic_product", "fruit", "food", "instrument", "train",
)  # fmt: skip
VSPW_THING_IDS = frozenset((
    2, 4, 8, 10, 41, 43, 44, 46, 47, 48, 49, 50, 51, 52, 54, 55, 56, 60, 61, 62, 63, 64, 65, 72,
    74, 76, 77, 78, 79, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91, 92, 95, 96, 97, 99, 100, 101,
    102, 106, 107, 108, 109, 114, 115, 116, 117, 118, 122, 123,
))  # fmt: skip
VSPW_CATEGORIES = [
    {"id": i, "name": name, "isthing": int(i in VSPW_THING_IDS), "color": distinct_color(i)}
    for i, name in enumerate(VSPW_NAMES)
]


def things_first(categories: Sequence[dict]) -> list[dict]:
    """The authors' contiguous order of a video panoptic or semantic class list: the things by
    dataset id, then the stuff by dataset id. Colours are filled in where missing."""
    for category in categories:
        if "id" not in category or "name" not in category or "isthing" not in category:
            raise ValueError(f"a category needs id, name and isthing, got {category!r:.200}")
    ordered = sorted(categories, key=lambda c: (not c["isthing"], c["id"]))
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "isthing": int(c["isthing"]),
            "color": list(c.get("color") or distinct_color(i)),
        }
        for i, c in enumerate(ordered)
    ]


class ClipSampler:
    """The frames of a training clip, by the authors' rule (`select_frames` of their mappers).

    - num_frames == 2 * frame_range + 1: `num_frames` consecutive frames from a uniform start;
      a video shorter than that gives all its frames and `num_frames - length` more drawn
      uniformly with replacement, sorted. With `reverse`, the clip is reversed with p = 0.5.
    - otherwise: a reference frame uniform over the video, and `num_frames - 1` frames drawn
      uniformly with replacement from the others within `frame_range` of it, sorted with it
      (a one-frame video repeats its frame).
    - `shuffle` then permutes the clip (the authors' SAMPLING_FRAME_SHUFFLE, off by default).

    The authors have no frame stride. Two deliberate differences from their code: the start of
    a window is uniform over all `length - num_frames + 1` windows (their `randrange(length -
    num_frames)` never picks the last one), and the frames of a short video are sorted (their
    code calls `sorted` without keeping the result).
    """

    def __init__(
        self,
        num_frames: int = DEFAULT_NUM_FRAMES,
        frame_range: int = DEFAULT_FRAME_RANGE,
        reverse: bool = False,
        shuffle: bool = False,
    ):
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if frame_range < 0:
            raise ValueError(f"frame_range must be >= 0, got {frame_range}")
        self.num_frames, self.frame_range = int(num_frames), int(frame_range)
        self.reverse, self.shuffle = reverse, shuffle

    def __repr__(self) -> str:
        return (
            f"ClipSampler(num_frames={self.num_frames}, frame_range={self.frame_range}, "
            f"reverse={self.reverse}, shuffle={self.shuffle})"
        )

    def __call__(self, length: int, generator: torch.Generator | None = None) -> list[int]:
        if length < 1:
            raise ValueError(f"cannot sample a clip from a video of {length} frames")
        count = self.num_frames
        if count == 2 * self.frame_range + 1:
            if length >= count:
                start = int(torch.randint(length - count + 1, (), generator=generator))
                chosen = list(range(start, start + count))
            else:
                extra = torch.randint(length, (count - length,), generator=generator)
                chosen = sorted(list(range(length)) + extra.tolist())
            if self.reverse and bool(torch.rand((), generator=generator) < 0.5):
                chosen = chosen[::-1]
        else:
            reference = int(torch.randint(length, (), generator=generator))
            low = max(0, reference - self.frame_range)
            high = min(length, reference + self.frame_range + 1)
            others = [i for i in range(low, high) if i != reference] or [reference]
            picks = torch.randint(len(others), (count - 1,), generator=generator)
            chosen = sorted([others[i] for i in picks.tolist()] + [reference])
        if self.shuffle:
            order = torch.randperm(count, generator=generator)
            chosen = [chosen[i] for i in order.tolist()]
        return chosen


class ClipTransforms:
    """`TrainTransforms` for a clip: one draw of flip, scale jitter, colour jitter, pad and
    random crop, applied alike to every frame and every mask of the clip.

    Tracks left without a pixel in any frame of the crop and crowd tracks are dropped; a crop
    that keeps no track is redrawn, up to max_tries times (then the last draw is returned).
    Frames stay uint8.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        scale_range: tuple[float, float],
        color_jitter: bool = False,
        max_tries: int = 10,
    ):
        self.image_transforms = TrainTransforms(crop_size, scale_range, color_jitter, max_tries)
        self.max_tries = max_tries

    def __call__(self, frames: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be (T, 3, H, W), got {tuple(frames.shape)}")
        masks = target["masks"]
        num_tracks, num_frames = masks.shape[:2]
        images = frames.float() / 255
        candidates = ~target["is_crowd"]
        for _ in range(self.max_tries):
            out, out_masks = self.image_transforms.augment_geometry(images, masks.flatten(0, 1))
            out_masks = out_masks.reshape(num_tracks, num_frames, *out_masks.shape[-2:])
            keep = out_masks.flatten(1).any(dim=1) & candidates
            if keep.any() or not candidates.any():
                break
        new_target = {
            **target,
            "masks": out_masks[keep],
            **{key: target[key][keep] for key in ("labels", "ids", "is_crowd")},
        }
        return (out * 255).round_().clamp_(0, 255).to(torch.uint8), new_target


def collate_clips(batch: list[tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, list[dict]]:
    """Clips of equal shape stacked to uint8 (B, T, 3, H, W), targets as a list. Videos of
    different sizes (evaluation) do not stack: load those one per batch."""
    frames, targets = zip(*batch)
    shapes = sorted({tuple(f.shape) for f in frames})
    if len(shapes) > 1:
        raise ValueError(
            f"collate_clips stacks clips of one shape, got {shapes}; give the loader "
            "batch_size=1 for whole videos of different sizes"
        )
    return torch.stack(frames), list(targets)


def load_frames(
    paths: Sequence["DataPath"], size: tuple[int, int] | None, where: "str | Sequence[str]"
) -> torch.Tensor:
    """uint8 frames (T, 3, H, W) from image files, each read once however often it repeats;
    each must be `size` (height, width), or with size None the size of the first (see
    `load_image_uint8`). Errors name the file and `where` (one for all, or one per path)."""
    wheres = [where] * len(paths) if isinstance(where, str) else list(where)
    read = {}
    for path, place in zip(paths, wheres):
        if path not in read:
            read[path] = load_image_uint8(path, size, place)
            size = size or tuple(read[path].shape[-2:])
    return torch.stack([read[path] for path in paths])


class VideoDataset(Dataset):
    """What the video readers share: a clip or the whole video per item, the bad-sample
    policy, transforms. A subclass fills `self.videos` (dicts with at least `video_id` and
    `length`) and implements `_read(video, frame_indices) -> (frames, target)` returning the
    target's masks, labels, ids, is_crowd and file_names."""

    videos: list[dict]
    bad_entries: dict[int, BadSampleError]

    def __init__(self, clip_sampler: ClipSampler | None, transforms: Callable | None):
        self.clip_sampler = clip_sampler
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def video_ids(self) -> list:
        return [video["video_id"] for video in self.videos]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if index in self.bad_entries:
            raise self.bad_entries[index]
        video = self.videos[index]
        if self.clip_sampler is None:
            frame_indices = list(range(video["length"]))
        else:
            frame_indices = self.clip_sampler(video["length"])
        frames, target = self._read(video, frame_indices)
        target.update(
            video_id=video["video_id"],
            frame_indices=frame_indices,
            orig_size=tuple(frames.shape[-2:]),
            length=video["length"],
        )
        if self.transforms is not None:
            frames, target = self.transforms(frames, target)
        return frames, target

    @staticmethod
    def read_maps(frame_indices: list[int], path_of: Callable, read: Callable) -> np.ndarray:
        """The label maps (T, H, W) of the frames, `read(path_of(frame))` once per distinct
        frame; BadSampleError for a map of another size than the first in the video."""
        maps, size, first = {}, None, None
        for frame in dict.fromkeys(frame_indices):
            path = path_of(frame)
            maps[frame] = read(path)
            if size is None:
                size, first = maps[frame].shape, path
            elif maps[frame].shape != size:
                raise BadSampleError(
                    f"{path}: size {maps[frame].shape} differs from {first}'s {size} in "
                    "the same video",
                    path,
                )
        return np.stack([maps[frame] for frame in frame_indices])

    def _read(self, video: dict, frame_indices: list[int]) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


def track_target(
    masks: list[np.ndarray], labels: list[int], ids: list[int], crowd: list[bool], shape
) -> dict:
    """The tensors of a target from per-track mask stacks (T, H, W); shape is (T, H, W)."""
    return {
        "masks": torch.from_numpy(np.stack(masks) if masks else np.zeros((0, *shape), bool)),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "ids": torch.tensor(ids, dtype=torch.int64),
        "is_crowd": torch.tensor(crowd, dtype=torch.bool),
    }
