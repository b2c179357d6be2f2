"""Reader for video instance segmentation in the YouTube-VIS format (YouTube-VIS 2019, 2021,
2022 and OVIS share it)."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eomt.data.bad_samples import BadSampleError, defer_or_raise
from eomt.data.categories import distinct_color
from eomt.data.coco_instance import decode_segmentation
from eomt.data.coco_panoptic import load_json, require_keys
from eomt.data.files import DataPath, resolve_path
from eomt.data.video import ClipSampler, VideoDataset, load_frames, track_target


class YTVISDataset(VideoDataset):
    """YouTube-VIS JSON: `videos` ({id, file_names, height, width[, length]}), `annotations`
    (one per track: {id, video_id, category_id, segmentations[, iscrowd]}, `segmentations`
    one entry per frame: polygons, a compressed or uncompressed RLE, or null where the track
    is absent) and `categories` ({id, name}). Frames are `image_dir/<file_name>`.

    As the authors' loader: videos sorted by id, labels contiguous in the order of the sorted
    category ids, all categories things; `ids` are the annotation ids. A JSON without
    `annotations` (or with null, the hidden validation splits) gives empty targets. A training
    clip holds the tracks present in at least one of its frames; the whole video holds every
    track. Crowd tracks are flagged in `is_crowd` (`ClipTransforms` drops them, as the
    authors do). Polygons of fewer than 3 points are ignored; a frame left without any counts
    as absent.

    Errors: a missing key or an annotation of an unknown video when built (ValueError naming
    the file and the field); with bad_samples="stop" also when built, with "skip" when the
    video is read, BadSampleError for a video whose `segmentations` (or `length`) do not have
    its number of frames, or a track of an unknown category; when read, a malformed
    segmentation or a frame of another size than the video's.
    """

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        json_file: "str | Path | DataPath",
        clip_sampler: ClipSampler | None = None,
        transforms: Callable | None = None,
        bad_samples: str = "stop",
    ):
        super().__init__(clip_sampler, transforms)
        self.image_dir = resolve_path(image_dir)
        self.json_file = resolve_path(json_file)
        self.categories_source = str(self.json_file)
        where = str(self.json_file)
        content = load_json(self.json_file)
        require_keys(content, ("videos", "categories"), where)
        annotations = content.get("annotations") or []
        for category in content["categories"]:
            require_keys(category, ("id", "name"), f"{where} category")
        categories = sorted(content["categories"], key=lambda c: c["id"])
        self.categories = [
            {
                "id": c["id"],
                "name": c["name"],
                "isthing": 1,
                "color": list(c.get("color", distinct_color(i))),
            }
            for i, c in enumerate(categories)
        ]
        self.label_of_category_id = {c["id"]: i for i, c in enumerate(self.categories)}

        videos = []
        for video in content["videos"]:
            require_keys(video, ("id", "file_names", "height", "width"), f"{where} video")
            if not isinstance(video["file_names"], list) or not video["file_names"]:
                raise ValueError(
                    f"{where}: video {video['id']}: file_names must be a non-empty list of "
                    f"frame paths, got {video['file_names']!r:.80}"
                )
            videos.append(
                {
                    "video_id": video["id"],
                    "file_names": list(video["file_names"]),
                    "length": len(video["file_names"]),
                    "declared_length": video.get("length"),
                    "height": int(video["height"]),
                    "width": int(video["width"]),
                    "tracks": [],
                }
            )
        videos.sort(key=lambda v: v["video_id"])
        index_of_video = {v["video_id"]: i for i, v in enumerate(videos)}

        problems = {}
        for index, video in enumerate(videos):
            declared = video.pop("declared_length")
            if declared is not None and declared != video["length"]:
                problems[index] = BadSampleError(
                    f"{where}: video {video['video_id']}: length {declared} differs from its "
                    f"{video['length']} file_names",
                    self.json_file,
                )
        for annotation in annotations:
            require_keys(
                annotation,
                ("id", "video_id", "category_id", "segmentations"),
                f"{where} annotation",
            )
            if annotation["video_id"] not in index_of_video:
                raise ValueError(
                    f"{where}: annotation {annotation['id']} refers to unknown video id "
                    f"{annotation['video_id']}"
                )
            index = index_of_video[annotation["video_id"]]
            video = videos[index]
            video["tracks"].append(annotation)
            segmentations = annotation["segmentations"]
            if not isinstance(segmentations, list) or len(segmentations) != video["length"]:
                count = len(segmentations) if isinstance(segmentations, list) else "no list of"
                problems.setdefault(
                    index,
                    BadSampleError(
                        f"{where}: annotation {annotation['id']} of video {video['video_id']}: "
                        f"segmentations has {count} entries, the video {video['length']} frames",
                        self.json_file,
                    ),
                )
            if annotation["category_id"] not in self.label_of_category_id:
                problems.setdefault(
                    index,
                    BadSampleError(
                        f"{where}: annotation {annotation['id']} of video {video['video_id']} "
                        f"has unknown category_id {annotation['category_id']}",
                        self.json_file,
                    ),
                )
        self.videos = videos
        self.bad_entries = defer_or_raise(problems, bad_samples)

    def _read(self, video: dict, frame_indices: list[int]) -> tuple[torch.Tensor, dict]:
        height, width = video["height"], video["width"]
        file_names = [video["file_names"][i] for i in frame_indices]
        frames = load_frames(
            [self.image_dir / name for name in file_names],
            (height, width),
            f"{self.json_file}, video {video['video_id']}",
        )
        masks, labels, ids, crowd = [], [], [], []
        for annotation in video["tracks"]:
            track = np.zeros((len(frame_indices), height, width), dtype=bool)
            present = False
            for t, frame in enumerate(frame_indices):
                segmentation = annotation["segmentations"][frame]
                if not segmentation:  # null (or empty): absent in this frame
                    continue
                where = (
                    f"{self.json_file}: annotation {annotation['id']} of video "
                    f"{video['video_id']}, frame {frame} ({video['file_names'][frame]})"
                )
                mask = decode_segmentation(segmentation, height, width, where, self.json_file)
                if mask is not None:
                    track[t] = mask
                    present = True
            if self.clip_sampler is not None and not present:
                continue
            masks.append(track)
            labels.append(self.label_of_category_id[annotation["category_id"]])
            ids.append(annotation["id"])
            crowd.append(bool(annotation.get("iscrowd", 0)))
        target = track_target(masks, labels, ids, crowd, (len(frame_indices), height, width))
        target["file_names"] = file_names
        return frames, target
