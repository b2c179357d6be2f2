"""Video readers (YouTube-VIS/OVIS, VIPSeg, VSPW), clip sampling, clip augmentation and the
synthetic video generator."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from eomt.data import (
    SYNTHETIC_CATEGORIES,
    VSPW_CATEGORIES,
    BadSampleError,
    ClipSampler,
    ClipTransforms,
    VIPSegDataset,
    VSPWDataset,
    YTVISDataset,
    collate_clips,
    generate_synthetic_videos,
    synthetic_video_paths,
)
from eomt.data.bad_samples import MissingSampleFileError
from eomt.data.build import SeededStream
from eomt.data.synthetic_video import MARKER_FILE

H, W = 12, 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one torch thread is far faster on a busy machine."""


@pytest.fixture(scope="module")
def videos_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic_video")
    generate_synthetic_videos(root, num_train=2, num_val=1, seed=4)
    return root


def _frame(t: int) -> np.ndarray:
    """A frame whose pixels differ across columns, rows and frames (exact in PNG)."""
    ys, xs = np.mgrid[0:H, 0:W]
    return np.stack([xs * 15, ys * 20, np.full_like(xs, 40 * t)], -1).astype(np.uint8)


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    if compressed:
        return {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    flat = mask.flatten(order="F").astype(int)  # uncompressed: run lengths, column-major
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    return {"size": [H, W], "counts": np.diff(np.concatenate([[0], changes])).tolist()}


def _box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _write_ytvis(root: Path, mutate=None) -> tuple[Path, Path, dict]:
    """Two videos (ids listed out of order) of PNG frames; video 5 has a track in compressed
    RLE, null and polygon frames, and a crowd track in uncompressed RLE."""
    image_dir = root / "JPEGImages"
    for name, length in (("a", 3), ("b", 2)):
        (image_dir / name).mkdir(parents=True)
        for t in range(length):
            Image.fromarray(_frame(t)).save(image_dir / name / f"{t:05d}.png")
    polygon = [2, 1, 9, 1, 9, 6, 2, 6]  # x, y: columns 2..9, rows 1..6
    content = {
        "videos": [
            {"id": 9, "file_names": ["b/00000.png", "b/00001.png"], "height": H, "width": W},
            {
                "id": 5,
                "file_names": [f"a/{t:05d}.png" for t in range(3)],
                "height": H,
                "width": W,
                "length": 3,
            },
        ],
        "annotations": [
            {
                "id": 11,
                "video_id": 5,
                "category_id": 7,
                "iscrowd": 0,
                "segmentations": [_rle(_box(0, 0, 4, 5)), None, [polygon]],
            },
            {
                "id": 12,
                "video_id": 5,
                "category_id": 3,
                "iscrowd": 1,
                "segmentations": [
                    _rle(_box(6, 6, 12, 16), compressed=False),
                    _rle(_box(5, 6, 12, 16), compressed=False),
                    None,
                ],
            },
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "ant"}],
    }
    if mutate is not None:
        mutate(content)
    json_file = root / "instances.json"
    json_file.write_text(json.dumps(content))
    return image_dir, json_file, content


class FixedFrames:
    """A clip sampler that always picks the given frames."""

    def __init__(self, frames):
        self.frames = frames

    def __call__(self, length, generator=None):
        return list(self.frames)


# YouTube-VIS / OVIS


def test_ytvis_reads_rle_polygons_and_null_frames(tmp_path):
    image_dir, json_file, _ = _write_ytvis(tmp_path)
    dataset = YTVISDataset(image_dir, json_file)
    assert len(dataset) == 2 and dataset.video_ids == [5, 9]  # sorted by id, as the authors
    assert [c["id"] for c in dataset.categories] == [3, 7]  # labels by sorted category id

    frames, target = dataset[0]
    assert frames.dtype == torch.uint8 and frames.shape == (3, 3, H, W)
    assert torch.equal(frames[2], torch.from_numpy(_frame(2)).permute(2, 0, 1))
    masks = target["masks"]
    assert masks.dtype == torch.bool and masks.shape == (2, 3, H, W)
    assert torch.equal(masks[0, 0], torch.from_numpy(_box(0, 0, 4, 5)))
    assert not masks[0, 1].any()  # null: absent in that frame
    polygon_mask = masks[0, 2].numpy()
    assert polygon_mask[2:6, 3:9].all() and not polygon_mask[8:].any()  # the polygon's box
    assert torch.equal(masks[1, 0], torch.from_numpy(_box(6, 6, 12, 16)))  # uncompressed RLE
    assert torch.equal(masks[1, 1], torch.from_numpy(_box(5, 6, 12, 16)))
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.int64
    assert target["ids"].tolist() == [11, 12] and target["ids"].dtype == torch.int64
    assert target["is_crowd"].tolist() == [False, True]
    assert target["video_id"] == 5 and target["orig_size"] == (H, W) and target["length"] == 3
    assert target["file_names"] == ["a/00000.png", "a/00001.png", "a/00002.png"]
    assert target["frame_indices"] == [0, 1, 2]

    frames, target = dataset[1]  # a video without annotations
    assert frames.shape == (2, 3, H, W) and target["masks"].shape == (0, 2, H, W)
    assert target["labels"].shape == target["ids"].shape == (0,)


def test_ytvis_without_annotations_gives_empty_targets(tmp_path):
    image_dir, json_file, _ = _write_ytvis(tmp_path, lambda c: c.update(annotations=None))
    frames, target = YTVISDataset(image_dir, json_file)[0]
    assert frames.shape == (3, 3, H, W) and target["masks"].shape == (0, 3, H, W)


def test_ytvis_clip_holds_the_tracks_present_in_its_frames(tmp_path):
    image_dir, json_file, _ = _write_ytvis(tmp_path)
    frames, target = YTVISDataset(image_dir, json_file, clip_sampler=FixedFrames([1]))[0]
    assert frames.shape == (1, 3, H, W) and target["ids"].tolist() == [12]  # 11 is null there
    assert target["frame_indices"] == [1] and target["file_names"] == ["a/00001.png"]
    frames, target = YTVISDataset(image_dir, json_file, clip_sampler=FixedFrames([2, 2]))[0]
    assert target["ids"].tolist() == [11] and torch.equal(frames[0], frames[1])
    assert torch.equal(target["masks"][0, 0], target["masks"][0, 1])


def test_ytvis_errors_name_the_file_and_the_field(tmp_path):
    def drop_key(content):
        del content["annotations"][0]["segmentations"]

    image_dir, json_file, _ = _write_ytvis(tmp_path / "a", drop_key)
    with pytest.raises(ValueError, match=r"instances\.json annotation.*'segmentations'"):
        YTVISDataset(image_dir, json_file)

    def short(content):
        content["annotations"][1]["segmentations"].pop()

    image_dir, json_file, _ = _write_ytvis(tmp_path / "b", short)
    with pytest.raises(BadSampleError, match=r"annotation 12 of video 5: segmentations has 2 "):
        YTVISDataset(image_dir, json_file)
    skipping = YTVISDataset(image_dir, json_file, bad_samples="skip")  # deferred to the read
    assert skipping[1][0].shape == (2, 3, H, W)
    with pytest.raises(BadSampleError, match="3 frames"):
        skipping[0]

    def wrong_length(content):
        content["videos"][1]["length"] = 4

    image_dir, json_file, _ = _write_ytvis(tmp_path / "c", wrong_length)
    with pytest.raises(BadSampleError, match=r"video 5: length 4 differs from its 3 file_names"):
        YTVISDataset(image_dir, json_file)

    def unknown_category(content):
        content["annotations"][0]["category_id"] = 99

    image_dir, json_file, _ = _write_ytvis(tmp_path / "d", unknown_category)
    with pytest.raises(BadSampleError, match="annotation 11 of video 5 has unknown category_id 99"):
        YTVISDataset(image_dir, json_file)

    def bad_rle_size(content):
        content["annotations"][0]["segmentations"][0]["size"] = [H + 1, W]

    image_dir, json_file, _ = _write_ytvis(tmp_path / "e", bad_rle_size)
    with pytest.raises(BadSampleError, match=r"annotation 11 of video 5, frame 0 .*RLE size"):
        YTVISDataset(image_dir, json_file)[0]

    image_dir, json_file, _ = _write_ytvis(tmp_path / "f")
    (image_dir / "a" / "00001.png").unlink()
    with pytest.raises(MissingSampleFileError, match=r"a/00001\.png"):
        YTVISDataset(image_dir, json_file)[0]


# VIPSeg


def _write_vipseg(root: Path, mutate=None) -> tuple[Path, Path, Path]:
    """One video of 3 frames: thing segment 2001 (category 5) moving right, stuff 3 (category
    0) elsewhere, a crowd segment 2002 in frame 1, and an unlisted id 77 in frame 2."""
    image_dir, png_dir = root / "images" / "vid", root / "panomasksRGB" / "vid"
    image_dir.mkdir(parents=True)
    png_dir.mkdir(parents=True)
    frames_info, annotations = [], []
    for t in range(3):
        ids = np.full((H, W), 3, dtype=np.int64)
        ids[2:6, 2 + t : 6 + t] = 2001
        segments = [
            {"id": 2001, "category_id": 5, "iscrowd": 0},
            {"id": 3, "category_id": 0, "iscrowd": 0},
        ]
        if t == 1:
            ids[8:, :4] = 2002
            segments.append({"id": 2002, "category_id": 5, "iscrowd": 1})
        if t == 2:
            ids[8:, 12:] = 77
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(png_dir / f"{t:08d}.png")
        Image.fromarray(_frame(t)).save(image_dir / f"{t:08d}.jpg", quality=100)
        frames_info.append({"id": f"{t:08d}", "file_name": f"{t:08d}.jpg"})
        annotations.append(
            {"image_id": f"{t:08d}", "file_name": f"{t:08d}.png", "segments_info": segments}
        )
    content = {
        "videos": [{"video_id": "vid", "images": frames_info}],
        "annotations": [{"video_id": "vid", "annotations": annotations}],
        "categories": [
            {"id": 9, "name": "rock", "isthing": 0},
            {"id": 5, "name": "dog", "isthing": 1},
            {"id": 0, "name": "wall", "isthing": 0},
            {"id": 7, "name": "car", "isthing": 1},
        ],
    }
    if mutate is not None:
        mutate(content)
    json_file = root / "panoptic_gt.json"
    json_file.write_text(json.dumps(content))
    return root / "images", json_file, root / "panomasksRGB"


def test_vipseg_reads_tracks_by_segment_id(tmp_path):
    image_dir, json_file, png_dir = _write_vipseg(tmp_path)
    dataset = VIPSegDataset(image_dir, json_file, png_dir)
    # The authors' layout: things by id, then stuff by id.
    assert [c["id"] for c in dataset.categories] == [5, 7, 0, 9]
    frames, target = dataset[0]
    assert frames.shape == (3, 3, H, W) and frames.dtype == torch.uint8
    assert target["ids"].tolist() == [2001, 3, 2002]
    assert target["labels"].tolist() == [0, 2, 0]
    assert target["is_crowd"].tolist() == [False, False, True]
    for t in range(3):
        expected = torch.zeros(H, W, dtype=torch.bool)
        expected[2:6, 2 + t : 6 + t] = True
        assert torch.equal(target["masks"][0, t], expected)  # one track, moving
    assert not target["masks"][2, 0].any() and target["masks"][2, 1].any()
    # The unlisted id 77 is unlabelled: no mask covers it.
    assert not target["masks"][:, 2, 8:, 12:].any()
    assert target["png_file_names"] == ["00000000.png", "00000001.png", "00000002.png"]
    assert target["file_names"][0] == "00000000.jpg" and target["video_id"] == "vid"


def test_vipseg_training_clip_leaves_out_crowd_segments(tmp_path):
    image_dir, json_file, png_dir = _write_vipseg(tmp_path)
    dataset = VIPSegDataset(image_dir, json_file, png_dir, clip_sampler=FixedFrames([0, 1]))
    _, target = dataset[0]
    assert target["ids"].tolist() == [2001, 3] and target["masks"].shape == (2, 2, H, W)


def test_vipseg_errors(tmp_path):
    def unknown(content):
        content["annotations"][0]["annotations"][1]["segments_info"][0]["category_id"] = 42

    with pytest.raises(BadSampleError, match=r"segment 2001 of video 'vid'.*category_id 42"):
        VIPSegDataset(*_write_vipseg(tmp_path / "a", unknown))

    def no_segments(content):
        del content["annotations"][0]["annotations"][0]["segments_info"]

    with pytest.raises(ValueError, match=r"panoptic_gt\.json video 'vid' frame .*segments_info"):
        VIPSegDataset(*_write_vipseg(tmp_path / "b", no_segments))


# VSPW


def _write_vspw(root: Path, labels: list[np.ndarray], name: str = "v1") -> None:
    origin, mask = root / "data" / name / "origin", root / "data" / name / "mask"
    origin.mkdir(parents=True)
    for t, label in enumerate(labels):
        Image.fromarray(_frame(t)).save(origin / f"{t:08d}.jpg")
        if label is not None:
            mask.mkdir(exist_ok=True)
            Image.fromarray(label.astype(np.uint8)).save(mask / f"{t:08d}.png")
    with open(root / "val.txt", "a") as split:
        split.write(f"{name}\n")


def test_vspw_one_track_per_class_in_the_authors_order(tmp_path):
    first = np.full((H, W), 1, dtype=np.uint8)  # 1: category 0 "wall" (stuff)
    first[:4] = 3  # 3: category 2 "door", the first thing
    first[-2:] = 0  # ignored
    second = np.full((H, W), 255, dtype=np.uint8)  # ignored
    second[:6, :6] = 3
    _write_vspw(tmp_path, [first, second])
    dataset = VSPWDataset(tmp_path / "data", tmp_path / "val.txt")
    num_things = sum(c["isthing"] for c in VSPW_CATEGORIES)
    assert num_things == 58 and len(dataset.categories) == 124
    assert dataset.categories[0]["name"] == "door" and dataset.categories[58]["name"] == "wall"
    frames, target = dataset[0]
    assert frames.shape == (2, 3, H, W) and target["video_id"] == "v1"
    assert target["labels"].tolist() == [0, 58] and target["ids"].tolist() == [0, 58]
    assert torch.equal(target["masks"][0, 0], torch.from_numpy(first == 3))
    assert torch.equal(target["masks"][0, 1], torch.from_numpy(second == 3))
    assert torch.equal(target["masks"][1, 0], torch.from_numpy(first == 1))
    assert not target["masks"][1, 1].any()  # wall absent in frame 1
    assert not target["masks"][:, :, -2:].any()  # 0 and 255 ignored
    assert target["file_names"] == ["00000000.jpg", "00000001.jpg"]

    _, target = VSPWDataset(tmp_path / "data", tmp_path / "val.txt", clip_sampler=FixedFrames([1]))[
        0
    ]
    assert target["labels"].tolist() == [0]  # only classes present in the clip


def test_vspw_unlabelled_videos_and_errors(tmp_path):
    label = np.full((H, W), 1, dtype=np.uint8)
    _write_vspw(tmp_path, [None, None], name="test_video")
    dataset = VSPWDataset(tmp_path / "data", tmp_path / "val.txt")
    frames, target = dataset[0]
    assert frames.shape == (2, 3, H, W) and target["masks"].shape == (0, 2, H, W)
    with pytest.raises(MissingSampleFileError, match="no mask folder"):
        VSPWDataset(tmp_path / "data", tmp_path / "val.txt", clip_sampler=ClipSampler())[0]

    other = tmp_path / "other"
    _write_vspw(other, [label, label, label])
    (other / "data" / "v1" / "mask" / "00000002.png").unlink()
    with pytest.raises(BadSampleError, match=r"v1: 3 frames in origin/ and 2 label PNGs"):
        VSPWDataset(other / "data", other / "val.txt")
    dataset = VSPWDataset(other / "data", other / "val.txt", bad_samples="skip")
    with pytest.raises(BadSampleError, match="do not pair"):
        dataset[0]

    unknown = tmp_path / "unknown"
    bad = label.copy()
    bad[0, 0] = 200
    _write_vspw(unknown, [label, bad])
    with pytest.raises(BadSampleError, match=r"00000001\.png: label value 200 is not a category"):
        VSPWDataset(unknown / "data", unknown / "val.txt")[0]

    with pytest.raises(MissingSampleFileError, match="frame folder not found"):
        (tmp_path / "val.txt").write_text("missing\n")
        VSPWDataset(tmp_path / "data", tmp_path / "val.txt")


# Clip sampling


def test_window_sampling_is_consecutive_inside_and_seeded():
    sampler = ClipSampler(num_frames=5, frame_range=2)  # the authors' defaults
    starts = set()
    for seed in range(200):
        clip = sampler(12, torch.Generator().manual_seed(seed))
        assert clip == list(range(clip[0], clip[0] + 5)) and 0 <= clip[0] and clip[-1] < 12
        assert clip == sampler(12, torch.Generator().manual_seed(seed))  # deterministic
        starts.add(clip[0])
    assert starts == set(range(8))  # every window, the last one included
    assert sampler(5, torch.Generator()) == [0, 1, 2, 3, 4]
    short = sampler(3, torch.Generator().manual_seed(1))
    assert len(short) == 5 and short == sorted(short) and set(short) == {0, 1, 2}
    reversed_seen = any(
        ClipSampler(5, 2, reverse=True)(12, torch.Generator().manual_seed(s))[0] > 0
        and ClipSampler(5, 2, reverse=True)(12, torch.Generator().manual_seed(s))[1]
        < ClipSampler(5, 2, reverse=True)(12, torch.Generator().manual_seed(s))[0]
        for s in range(20)
    )
    assert reversed_seen


def test_reference_sampling_stays_within_range_and_is_sorted():
    sampler = ClipSampler(num_frames=3, frame_range=4)
    clips = [sampler(30, torch.Generator().manual_seed(s)) for s in range(100)]
    for clip in clips:
        assert clip == sorted(clip) and len(clip) == 3
        assert 0 <= clip[0] and clip[-1] < 30 and clip[-1] - clip[0] <= 8
    assert len({tuple(c) for c in clips}) > 20  # seeds give different clips
    assert sampler(1, torch.Generator()) == [0, 0, 0]  # a one-frame video repeats it
    with pytest.raises(ValueError, match="0 frames"):
        sampler(0)


def test_global_rng_sampling_follows_the_torch_seed():
    sampler = ClipSampler(num_frames=3, frame_range=5)
    torch.manual_seed(7)
    first = [sampler(40) for _ in range(5)]
    torch.manual_seed(7)
    assert [sampler(40) for _ in range(5)] == first


# Clip augmentation


def _still_clip(num_frames: int = 4) -> tuple[torch.Tensor, dict]:
    """Identical frames with an asymmetric pattern, and a track whose mask is the same in all."""
    frame = torch.from_numpy(_frame(1)).permute(2, 0, 1)
    mask = torch.from_numpy(_box(2, 1, 7, 6))
    target = {
        "masks": mask.expand(2, num_frames, H, W).clone(),
        "labels": torch.tensor([3, 4]),
        "ids": torch.tensor([10, 20]),
        "is_crowd": torch.tensor([False, True]),
    }
    return frame.expand(num_frames, 3, H, W).clone(), target


def test_clip_transforms_apply_one_draw_to_every_frame():
    frames, target = _still_clip()
    transforms = ClipTransforms(crop_size=(10, 10), scale_range=(0.6, 1.8), color_jitter=True)
    for seed in range(10):
        torch.manual_seed(seed)
        out, out_target = transforms(frames, target)
        assert out.dtype == torch.uint8 and out.shape == (4, 3, 10, 10)
        assert all(torch.equal(out[0], out[t]) for t in range(4))  # same flip/scale/crop/jitter
        masks = out_target["masks"]
        assert all(torch.equal(masks[:, 0], masks[:, t]) for t in range(4))
        assert out_target["ids"].tolist() == [10]  # the crowd track is dropped
        assert masks.shape == (1, 4, 10, 10) and masks.any()


def test_clip_flip_flips_every_frame_and_mask():
    frames = torch.stack([torch.from_numpy(_frame(t)).permute(2, 0, 1) for t in range(3)])
    masks = torch.stack([torch.from_numpy(_box(2, t, 7, t + 4)) for t in range(3)])[None]
    target = {
        "masks": masks,
        "labels": torch.tensor([0]),
        "ids": torch.tensor([1]),
        "is_crowd": torch.tensor([False]),
    }
    transforms = ClipTransforms(crop_size=(H, W), scale_range=(1.0, 1.0))
    outcomes = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out, out_target = transforms(frames, target)
        flipped = torch.equal(out, frames.flip(-1))
        assert flipped or torch.equal(out, frames)
        expected = masks.flip(-1) if flipped else masks
        assert torch.equal(out_target["masks"], expected)
        outcomes.add(flipped)
    assert outcomes == {True, False}


def test_seeded_stream_reproduces_a_clip(videos_root):
    paths = synthetic_video_paths(videos_root, "train")["ytvis"]
    dataset = YTVISDataset(
        **paths,
        clip_sampler=ClipSampler(3, 6),
        transforms=ClipTransforms((64, 64), (0.5, 1.5), color_jitter=True),
    )
    stream = SeededStream(dataset, seed=11)
    first, again = stream[4], stream[4]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1]["masks"], again[1]["masks"])
    assert first[1]["frame_indices"] == again[1]["frame_indices"]
    frames, targets = collate_clips([stream[4], stream[5]])
    assert frames.shape == (2, 3, 3, 64, 64) and len(targets) == 2
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_clips([(torch.zeros(2, 3, 4, 4), {}), (torch.zeros(2, 3, 4, 5), {})])


# Synthetic videos


def test_synthetic_videos_are_seeded_and_skipped_when_complete(videos_root, tmp_path):
    assert not generate_synthetic_videos(videos_root, num_train=2, num_val=1, seed=4)
    copy = tmp_path / "copy"
    assert generate_synthetic_videos(copy, num_train=2, num_val=1, seed=4)
    files = sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(videos_root) for p in videos_root.rglob("*") if p.is_file()
    )
    for name in files:
        assert (copy / name).read_bytes() == (videos_root / name).read_bytes(), name


def test_an_interrupted_generation_is_redone(tmp_path):
    assert generate_synthetic_videos(tmp_path, num_train=1, num_val=0, seed=1)
    assert not generate_synthetic_videos(tmp_path, num_train=1, num_val=0, seed=1)
    (tmp_path / MARKER_FILE).unlink()  # as after an interrupted run: the marker comes last
    stale = tmp_path / "vspw" / "data" / "stale.txt"
    stale.write_text("left over")
    assert generate_synthetic_videos(tmp_path, num_train=1, num_val=0, seed=1)
    assert not stale.exists() and (tmp_path / MARKER_FILE).is_file()


def test_synthetic_track_ids_are_stable_across_frames_and_formats(videos_root):
    moving = entering_or_leaving = occluded = 0
    for split in ("train", "val"):
        paths = synthetic_video_paths(videos_root, split)
        ytvis = YTVISDataset(**paths["ytvis"])
        vipseg = VIPSegDataset(**paths["vipseg"])
        vspw = VSPWDataset(**paths["vspw"], categories=SYNTHETIC_CATEGORIES)
        assert len(ytvis) == len(vipseg) == len(vspw) == (2 if split == "train" else 1)
        for index in range(len(ytvis)):
            frames, instances = ytvis[index]
            same_frames, panoptic = vipseg[index]
            _, semantic = vspw[index]
            assert 8 <= frames.shape[0] <= 24 and 128 <= min(frames.shape[-2:])
            assert torch.equal(frames, same_frames)
            # Every pixel of every frame belongs to exactly one panoptic track.
            assert torch.equal(
                panoptic["masks"].sum(0),
                torch.ones(frames.shape[0], *frames.shape[-2:], dtype=torch.long),
            )
            for track, label in zip(instances["masks"], instances["labels"]):
                # The panoptic track that matches the instance track in its first frame
                # matches it in every frame: one identity throughout, in both formats.
                first = int(track.flatten(1).any(1).nonzero()[0])
                match = [
                    i
                    for i, m in enumerate(panoptic["masks"])
                    if torch.equal(m[first], track[first])
                ]
                assert len(match) == 1 and torch.equal(panoptic["masks"][match[0]], track)
                thing = panoptic["labels"][match[0]]
                assert SYNTHETIC_CATEGORIES[thing]["id"] == ytvis.categories[label]["id"]
                present = track.flatten(1).any(1)
                entering_or_leaving += bool(not present[0] or not present[-1])
                areas = track.flatten(1).sum(1)
                centroids = [m.nonzero().float().mean(0) for m in track[present]]
                moving += bool((centroids[0] - centroids[-1]).norm() > 3)
                occluded += bool(areas[present].min() < 0.8 * areas.max())
            # The semantic tracks are the panoptic segments merged by class.
            for mask, label in zip(semantic["masks"], semantic["labels"]):
                merged = panoptic["masks"][panoptic["labels"] == label].any(0)
                assert torch.equal(mask, merged)
    assert moving and entering_or_leaving and occluded


def test_prepare_synthetic_video_cli(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_synthetic_video",
        Path(__file__).resolve().parents[1] / "datasets" / "prepare_synthetic_video.py",
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = ["--output", str(tmp_path / "v"), "--num-train", "1", "--num-val", "1", "--seed", "2"]
    module.main(module.parse_args(args))
    assert "Wrote 1 train + 1 val videos" in capsys.readouterr().out
    module.main(module.parse_args(args))
    assert "nothing to do" in capsys.readouterr().out
    assert len(YTVISDataset(**synthetic_video_paths(tmp_path / "v", "val")["ytvis"])) == 1


@pytest.mark.parametrize(
    "name", ["synthetic_video_vis", "synthetic_video_vps", "synthetic_video_vss"]
)
def test_check_dataset_reads_video_layouts(videos_root, name):
    """datasets/check_dataset.py's check on the video layouts: videos, frames and tracks."""
    from eomt.data.layouts import check_dataset

    lines = []
    assert check_dataset(name, videos_root, num_samples=1, report=lines.append), lines
    assert "  2 videos" in "\n".join(lines) and "  1 videos" in "\n".join(lines)
    samples = [line for line in lines if line.startswith("  sample 0: video")]
    assert len(samples) == 2 and all(" frames " in s and s.endswith(" tracks") for s in samples)
