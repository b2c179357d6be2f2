"""Reader for video panoptic segmentation in the VIPSeg format (per-frame panoptic PNGs + JSON)."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from eomt.data.bad_samples import BadSampleError, defer_or_raise
from eomt.data.coco_panoptic import load_json, read_panoptic_png, require_keys
from eomt.data.files import DataPath, resolve_path
from eomt.data.video import ClipSampler, VideoDataset, load_frames, things_first, track_target


class VIPSegDataset(VideoDataset):
    """VIPSeg JSON (as `panoptic_gt_VIPSeg_{train,val}.json` of VIPSeg_720P):

    - `videos`: [{video_id, images: [{id, file_name[, height, width]}]}];
    - `annotations`: [{video_id, annotations: [{image_id, file_name, segments_info: [{id,
      category_id[, iscrowd]}]}]}], one entry per annotated video, its frames in order;
    - `categories`: [{id, name, isthing[, color]}].

    As the authors' loader (videomt/data_video/datasets/vps.py): the videos are those of
    `annotations`, in its order; frame k of a video is the image
    `image_dir/<video_id>/<stem of its image file_name>.jpg` and the panoptic PNG
    `png_dir/<video_id>/<file_name of the frame annotation>` (segment id = R + 256 G + 256^2 B).
    Labels follow the authors' layout: the things by category id, then the stuff by category
    id (`self.categories` in that order). A track is a segment id: `ids` are segment ids, one
    track per segment id however many frames it spans, its class that of its first listing.

    A training clip holds the non-crowd segments listed in its frames whose id is in its PNGs
    (the authors' rule); the whole video holds every listed segment, crowd flagged. A track's
    mask is its id's pixels in every frame; pixels of an id listed in no frame are unlabelled,
    and a listed id absent from the PNGs (a segment lost in resizing) is tolerated, as the
    authors' code does.

    Errors: a missing key or an annotation of an unknown video when built (ValueError naming
    the file and the field); with bad_samples="stop" also when built, with "skip" when the
    video is read, BadSampleError for a frame annotation whose image_id is not an image of its
    video, or a segment of an unknown category; when read, a missing or unreadable file, or
    frames of different sizes.
    """

    def __init__(
        self,
        image_dir: "str | Path | DataPath",
        json_file: "str | Path | DataPath",
        png_dir: "str | Path | DataPath",
        clip_sampler: ClipSampler | None = None,
        transforms: Callable | None = None,
        bad_samples: str = "stop",
    ):
        super().__init__(clip_sampler, transforms)
        self.image_dir = resolve_path(image_dir)
        self.json_file = resolve_path(json_file)
        self.png_dir = resolve_path(png_dir)
        self.categories_source = str(self.json_file)
        where = str(self.json_file)
        content = load_json(self.json_file)
        require_keys(content, ("videos", "annotations", "categories"), where)
        for category in content["categories"]:
            require_keys(category, ("id", "name", "isthing"), f"{where} category")
        self.categories = things_first(content["categories"])
        self.label_of_category_id = {c["id"]: i for i, c in enumerate(self.categories)}

        images_of_video = {}
        for video in content["videos"]:
            require_keys(video, ("video_id", "images"), f"{where} video")
            for image in video["images"]:
                require_keys(image, ("id", "file_name"), f"{where} video {video['video_id']} image")
            images_of_video[video["video_id"]] = {i["id"]: i for i in video["images"]}

        self.videos, problems = [], {}
        for entry in content["annotations"]:
            require_keys(entry, ("video_id", "annotations"), f"{where} annotation")
            video_id = entry["video_id"]
            if video_id not in images_of_video:
                raise ValueError(f"{where}: annotations of unknown video_id {video_id!r}")
            if not entry["annotations"]:
                raise ValueError(f"{where}: video {video_id!r}: annotations has no frame")
            index = len(self.videos)
            file_names, png_names, frames = [], [], []
            for frame in entry["annotations"]:
                require_keys(
                    frame,
                    ("image_id", "file_name", "segments_info"),
                    f"{where} video {video_id!r} frame annotation",
                )
                for segment in frame["segments_info"]:
                    require_keys(segment, ("id", "category_id"), f"{where} segment")
                    if segment["category_id"] not in self.label_of_category_id:
                        problems.setdefault(
                            index,
                            BadSampleError(
                                f"{where}: segment {segment['id']} of video {video_id!r}, frame "
                                f"{frame['file_name']} has unknown category_id "
                                f"{segment['category_id']}",
                                self.json_file,
                            ),
                        )
                image = images_of_video[video_id].get(frame["image_id"])
                if image is None:
                    problems.setdefault(
                        index,
                        BadSampleError(
                            f"{where}: video {video_id!r}: frame annotation {frame['file_name']} "
                            f"has image_id {frame['image_id']!r}, not an image of the video",
                            self.json_file,
                        ),
                    )
                    image = {"file_name": frame["file_name"]}
                file_names.append(image["file_name"].split(".")[0] + ".jpg")
                png_names.append(frame["file_name"])
                frames.append(frame["segments_info"])
            self.videos.append(
                {
                    "video_id": video_id,
                    "length": len(frames),
                    "file_names": file_names,
                    "png_names": png_names,
                    "segments": frames,
                }
            )
        self.bad_entries = defer_or_raise(problems, bad_samples)

    def _read(self, video: dict, frame_indices: list[int]) -> tuple[torch.Tensor, dict]:
        video_id = str(video["video_id"])
        png_paths = [self.png_dir / video_id / name for name in video["png_names"]]
        segment_ids = self.read_maps(frame_indices, png_paths.__getitem__, read_panoptic_png)
        frames = load_frames(
            [self.image_dir / video_id / video["file_names"][frame] for frame in frame_indices],
            segment_ids.shape[1:],
            [str(png_paths[frame]) for frame in frame_indices],
        )

        training = self.clip_sampler is not None
        tracks = {}  # segment id -> (category id, crowd), in order of first listing
        for frame in frame_indices:
            for segment in video["segments"][frame]:
                crowd = bool(segment.get("iscrowd", 0))
                if training and crowd:
                    continue
                tracks.setdefault(segment["id"], (segment["category_id"], crowd))
        present = set(np.unique(segment_ids).tolist())
        masks, labels, ids, crowds = [], [], [], []
        for segment_id, (category_id, crowd) in tracks.items():
            if training and segment_id not in present:
                continue
            masks.append(segment_ids == segment_id)
            labels.append(self.label_of_category_id[category_id])
            ids.append(segment_id)
            crowds.append(crowd)
        target = track_target(masks, labels, ids, crowds, segment_ids.shape)
        target["file_names"] = [video["file_names"][i] for i in frame_indices]
        target["png_file_names"] = [video["png_names"][i] for i in frame_indices]
        return frames, target
