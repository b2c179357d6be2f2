"""Segment videos with VidEoMT: frames streamed through `VidEoMT.step`, identities kept by the
model's queries, outputs written as the frames come.

A video is a file (decoded with PyAV) or a folder of frames (its images in name order). Each
frame goes through the model once, with the queries the previous frame left (`VideoStream`):
the state between frames is those queries, (K, D), and the running sum of the class logits,
(K, C+1), so memory stays flat over any length. Query k is one identity over the whole video
(no tracker):

- panoptic: a thing segment's id is its query's, k + 1; a stuff segment's id is K + 1 + its
  class (one per class, as the image predictor merges stuff), so ids are stable for as long as
  a query keeps its object;
- instance: a track is a (query, class) pair; its mask in a frame is the query's mask logit > 0
  (null where empty);
- semantic: per pixel, the class of the summed query masks weighted by class probabilities.

Class scores: the VidEoMT authors average each query's class logits over the frames of the
video and take the softmax of the average (their online model's `post_processing`); the
instance tracks (top `max_tracks` of query x class by that score, as their `inference_video_vis`,
10 for YouTube-VIS) and their scores in results.json are exactly that, over the whole video.
A frame's own outputs (panoptic and semantic PNGs, the overlay) cannot wait for the frames
after it: they use the average over the frames so far (frames 0..t), the causal form of the
same rule, so that a query's class settles instead of flickering with each frame.

Instance masks of every query are kept on disk (`tracks.spool`, a temporary beside the outputs,
deleted at the end) until the video is done, since which queries make the top tracks is known
only then; results.json is written from it.
"""

from __future__ import annotations

import json
import pickle
import statistics
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from eomt.data import BadSampleError, load_image
from eomt.deploy.runtime import AUTOCAST_DTYPES, WEIGHT_DTYPES, sdpa_context
from eomt.evaluation.postprocess import panoptic_segments
from eomt.evaluation.video_postprocess import top_tracks
from eomt.inference import resize_and_pad, restore_logits, to_uint8
from eomt.pictures import draw_panoptic, draw_semantic, upscale_factor
from eomt.tasks import get_task
from eomt.tasks.base import json_score

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")
DEFAULT_MAX_TRACKS = 10  # the authors' MAX_NUM for YouTube-VIS
DEFAULT_FRAME_RATE = 24.0  # of the overlay video of a folder of frames
SPOOL_NAME = "tracks.spool"


def is_video_model(model) -> bool:
    """Whether `model` streams video with identities: VidEoMT (or a model with its `step`)."""
    return callable(getattr(model, "step", None)) and hasattr(model, "query_updater")


def require_video_model(model, cfg) -> None:
    if not is_video_model(model):
        raise ValueError(
            f"video prediction needs a VidEoMT checkpoint (model.name videomt), whose queries "
            f"carry each object from frame to frame; this one is model.name "
            f"{cfg.model.name!r}: predict the frames one by one as images instead "
            "(tools/predict.py --input FOLDER_OF_FRAMES), without identities across frames"
        )


# -- reading -------------------------------------------------------------------------------------


class VideoSource:
    """The frames of a video file or of a folder of images: iterate for (name, frame (3, H, W)
    float in [0, 1]); `frame_rate` (the file's, else `DEFAULT_FRAME_RATE`), `frame_count`
    (the container's count, None if it has none), `kind` ("video" or "frames").

    A missing path raises FileNotFoundError; a file that is not a decodable video, or a frame
    that cannot be decoded, BadSampleError naming the file."""

    def __init__(self, path: str | Path, frame_rate: float | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such video file or folder of frames")
        if self.path.is_dir():
            from eomt.deploy.predictor import find_images, unique_stems

            self.kind = "frames"
            self.files = find_images(self.path)
            self.frame_count = len(self.files)
            self.frame_rate = frame_rate or DEFAULT_FRAME_RATE
            self.names = unique_stems(self.files)
            return
        self.kind, self.files = "video", None
        container = self._open()
        try:
            stream = container.streams.video[0]
            self.frame_count = stream.frames or None
            rate = stream.average_rate or stream.guessed_rate
            self.frame_rate = frame_rate or (float(rate) if rate else DEFAULT_FRAME_RATE)
        finally:
            container.close()

    def _open(self):
        import av  # PyAV: only video prediction needs it

        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, UnicodeDecodeError) as error:
            raise BadSampleError(
                f"{self.path}: cannot be read as a video ({error})", self.path
            ) from error
        if not container.streams.video:
            container.close()
            raise BadSampleError(f"{self.path}: has no video stream", self.path)
        return container

    def __iter__(self):
        if self.kind == "frames":
            for file, name in zip(self.files, self.names):
                yield name, load_image(file)
            return
        import av

        container = self._open()
        index = 0
        try:
            decoded = container.decode(video=0)
            while True:
                try:
                    frame = next(decoded)
                except StopIteration:
                    break
                except av.FFmpegError as error:
                    raise BadSampleError(
                        f"{self.path}: frame {index} cannot be decoded ({error})", self.path
                    ) from error
                pixels = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                yield f"{index:06d}", pixels.float() / 255
                index += 1
        finally:
            container.close()
        if index == 0:
            raise BadSampleError(f"{self.path}: no frame could be decoded", self.path)


# -- streaming -----------------------------------------------------------------------------------


@dataclass
class VideoFrame:
    """One frame's prediction. `result` is the task's (as the image predictor's, with stable
    ids, see the module docstring): panoptic (segment map (H, W) int32, segments [{id, label,
    category_id, isthing, score, queries}]); semantic label map (H, W); instance {masks
    (M, H, W), scores, labels, category_ids, queries (M,)}, the `max_tracks` best (query, class)
    pairs so far. `class_probs` (K, C+1): softmax of each query's class logits averaged over
    frames 0..index; `query_masks` (instance only): every query's mask (K, H, W), logit > 0."""

    index: int
    result: object
    class_probs: torch.Tensor
    query_masks: torch.Tensor | None = None
    model_seconds: float = 0.0


# A video task's frames are written as its image task writes an image.
FRAME_TASKS = {"vis": "instance", "vps": "panoptic", "vss": "semantic"}


class VideoStream:
    """`stream.predict(frame)` -> `VideoFrame`, keeping VidEoMT's queries between calls: the
    frames of one video, in order. A frame is any form `Predictor` accepts; frames of one video
    share a size. `reset()` starts another video. Memory: the state is `state_tensors()`,
    whatever the number of frames."""

    def __init__(self, predictor, task: str | None = None, max_tracks: int = DEFAULT_MAX_TRACKS):
        require_video_model(predictor.model, predictor.cfg)
        if max_tracks < 1:
            raise ValueError(f"max_tracks must be >= 1, got {max_tracks}")
        name = task or predictor.cfg.task
        self.predictor, self.task = predictor, get_task(FRAME_TASKS.get(name, name))
        self.max_tracks = max_tracks
        categories = predictor.categories
        self.is_thing = [bool(c["isthing"]) for c in categories]
        things = [i for i, thing in enumerate(self.is_thing) if thing]
        # As the image task: instances of thing classes only when the dataset has stuff.
        self.instance_classes = None if len(things) == len(categories) else things
        self.reset()

    def reset(self) -> None:
        self.queries: torch.Tensor | None = None
        self.class_logit_sum: torch.Tensor | None = None
        self.frames = 0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What is kept between frames (constant size over a video)."""
        state = {"queries": self.queries, "class_logit_sum": self.class_logit_sum}
        return {name: tensor for name, tensor in state.items() if tensor is not None}

    def mean_class_logits(self) -> torch.Tensor:
        """(K, C+1): each query's class logits averaged over the frames seen."""
        if not self.frames:
            raise ValueError("no frame predicted yet")
        return self.class_logit_sum / self.frames

    @torch.no_grad()
    def step_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One frame (3, H, W) in [0, 1] through the model with the carried queries -> mask
        logits (K, H, W) at the frame's size, the frame's class logits (K, C+1), and the
        seconds the model's step took."""
        predictor = self.predictor
        forward, device = predictor.forward, predictor.device
        size = tuple(predictor.cfg.input.image_size)
        padded, inner = resize_and_pad(image.to(device), size)
        autocast = torch.autocast(
            device.type,
            dtype=AUTOCAST_DTYPES[forward.autocast],
            enabled=forward.autocast != "none",
        )
        start = time.perf_counter()
        with autocast, sdpa_context(forward.sdpa_backend):
            frames = padded[None].to(WEIGHT_DTYPES[forward.weights_dtype])
            prediction, self.queries = predictor.model.step(frames, self.queries)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        mask_logits = restore_logits(
            prediction["mask_logits"][0].float(), inner, size, tuple(image.shape[-2:])
        )
        return mask_logits, prediction["class_logits"][0].float(), seconds

    def predict(self, frame) -> VideoFrame:
        from eomt.deploy.predictor import as_image_tensor

        image = as_image_tensor(frame)
        mask_logits, class_logits, seconds = self.step_logits(image)
        if self.class_logit_sum is None:
            self.class_logit_sum = torch.zeros_like(class_logits)
        self.class_logit_sum += class_logits
        self.frames += 1
        probs = self.mean_class_logits().softmax(-1)
        categories = self.predictor.categories
        test = self.predictor.cfg.test
        query_masks = None
        if self.task.name == "panoptic":
            seg, segments = stable_panoptic(
                mask_logits, probs, self.is_thing, test.score_threshold, test.overlap_threshold
            )
            for segment in segments:
                segment["category_id"] = categories[segment["label"]]["id"]
            result = (seg, segments)
        elif self.task.name == "semantic":
            result = torch.einsum("kc,khw->chw", probs[:, :-1], mask_logits.sigmoid()).argmax(0)
        else:
            query_masks = mask_logits > 0
            result = top_tracks(probs, self.max_tracks, self.instance_classes)
            result["masks"] = query_masks[result["queries"]]
            ids = result["labels"].new_tensor([c["id"] for c in categories])
            result["category_ids"] = ids[result["labels"]]
        return VideoFrame(self.frames - 1, result, probs.cpu(), query_masks, seconds)


def stable_panoptic(
    mask_logits: torch.Tensor,
    class_probs: torch.Tensor,
    is_thing: list[bool],
    score_threshold: float,
    overlap_threshold: float,
) -> tuple[torch.Tensor, list[dict]]:
    """`eomt.evaluation.postprocess.panoptic_inference`'s rules (Mask2Former's, the authors'
    `inference_video_vps` per frame) on class probabilities (K, C+1), with ids that follow the
    queries: a thing segment of query k is k + 1, the stuff segment of class c is K + 1 + c.
    Segments: {id, label (contiguous class), isthing, score, queries}."""
    num_queries, num_classes = mask_logits.shape[0], class_probs.shape[1] - 1
    scores, classes = class_probs.max(-1)
    kept = ((classes != num_classes) & (scores > score_threshold)).nonzero().flatten()
    seg = torch.zeros(mask_logits.shape[-2:], dtype=torch.int32, device=mask_logits.device)
    if not len(kept):
        return seg, []
    mask_probs = mask_logits[kept].float().sigmoid()
    queries = kept.tolist()
    segments: dict[int, dict] = {}
    for index, segment_mask, label, score in panoptic_segments(
        mask_probs, scores[kept].to(mask_probs), classes[kept], overlap_threshold
    ):
        query, thing = queries[index], bool(is_thing[label])
        segment_id = query + 1 if thing else num_queries + 1 + label
        seg.masked_fill_(segment_mask, segment_id)
        if segment_id in segments:  # stuff of a class already present: one segment
            segments[segment_id]["score"] = max(segments[segment_id]["score"], score)
            segments[segment_id]["queries"].append(query)
        else:
            segments[segment_id] = {
                "id": segment_id,
                "label": label,
                "isthing": int(thing),
                "score": score,
                "queries": [query],
            }
    return seg, list(segments.values())


# -- writing -------------------------------------------------------------------------------------


class OverlayVideo:
    """An H.264 (or, without libx264, MPEG-4) video written frame by frame with PyAV; opened at
    the first frame, whose size (padded to even) every frame then has."""

    def __init__(self, path: Path, frame_rate: float):
        self.path, self.frame_rate = Path(path), frame_rate
        self.container = self.stream = None
        self.frames = 0

    def write(self, picture: np.ndarray) -> None:
        import av

        height, width = picture.shape[:2]
        if self.container is None:
            self.container = av.open(str(self.path), mode="w")
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            rate = Fraction(self.frame_rate).limit_denominator(1001)
            self.stream = self.container.add_stream(codec, rate=rate)
            self.stream.width, self.stream.height = width + width % 2, height + height % 2
            self.stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                self.stream.options = {"preset": "veryfast"}
        padded = np.zeros((self.stream.height, self.stream.width, 3), dtype=np.uint8)
        padded[: min(height, self.stream.height), : min(width, self.stream.width)] = picture[
            : self.stream.height, : self.stream.width
        ]
        frame = av.VideoFrame.from_ndarray(padded, format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self.container is None:
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self.container = None

    def discard(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None
        self.path.unlink(missing_ok=True)


class TrackSpool:
    """Every query's mask in every frame (compressed RLE, None where empty), appended to a
    file frame by frame and read back once at the end for the tracks chosen then."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.frames = 0

    def add(self, query_masks: torch.Tensor) -> None:
        from pycocotools import mask as mask_utils

        query_masks = query_masks.cpu()
        present = query_masks.flatten(1).any(1)
        entry = {"size": list(query_masks.shape[1:]), "rles": {}}
        if present.any():
            # (P, W, H) in C order is (H, W, P) in Fortran order, as pycocotools takes masks:
            # one transposing copy, by torch.
            masks = query_masks[present].transpose(1, 2).contiguous().numpy().view(np.uint8)
            rles = mask_utils.encode(masks.transpose(2, 1, 0))
            queries = present.nonzero().flatten().tolist()
            entry["rles"] = {q: rle["counts"] for q, rle in zip(queries, rles)}
        pickle.dump(entry, self.file, protocol=pickle.HIGHEST_PROTOCOL)
        self.frames += 1

    def tracks(self, queries: list[int]) -> dict[int, list]:
        """{query: per frame a compressed RLE dict or None}, for `queries`."""
        self.file.close()
        found = {q: [] for q in queries}
        with open(self.path, "rb") as file:
            for _ in range(self.frames):
                entry = pickle.load(file)  # our own file, written above
                for query, segmentations in found.items():
                    counts = entry["rles"].get(query)
                    segmentations.append(
                        None
                        if counts is None
                        else {"size": entry["size"], "counts": counts.decode("ascii")}
                    )
        return found

    def remove(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


@dataclass
class VideoSummary:
    """What `write_video_predictions` did: frames, seconds, frames per second (end to end:
    decoding, model, post-processing and files) and of the model's step alone (median), the
    files written."""

    frames: int = 0
    seconds: float = 0.0
    model_ms: list = field(default_factory=list, repr=False)
    files: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0

    @property
    def model_fps(self) -> float:
        return 1000 / statistics.median(self.model_ms) if self.model_ms else 0.0

    def describe(self) -> str:
        return (
            f"{self.frames} frames in {self.seconds:.1f} s: {self.fps:.2f} frames/s end to end, "
            f"{self.model_fps:.2f} frames/s for the model's step (median)"
        )


def write_video_predictions(
    predictor,
    source: str | Path | VideoSource,
    output_dir: str | Path,
    task: str | None = None,
    overlay: bool = True,
    max_tracks: int = DEFAULT_MAX_TRACKS,
    score_threshold: float = 0.5,
    video_id=None,
    frame_rate: float | None = None,
    progress: bool = True,
    on_frame=None,
) -> VideoSummary:
    """Predict a video (file or folder of frames) frame by frame and write, under `output_dir`:

    panoptic: panoptic/<frame>.png (segment ids as R + 256 G + 256^2 B, stable over frames)
        and panoptic.json (COCO panoptic, a frame per image, image id <frame>);
    semantic: semantic/<frame>.png (contiguous labels; 16-bit above 255 classes);
    instance: results.json, YouTube-VIS results ([{video_id, category_id, score,
        segmentations: per frame a compressed RLE or null, query}]) of the top `max_tracks`
        tracks;
    overlay.mp4 (unless `overlay` is False): the frames with the segments (instances of the
        frame's score >= `score_threshold`) coloured by identity; video.json: frames, size,
        frame rates, timings, the rules of ids and scores.

    <frame> is the frame file's stem (a folder) or the frame's index, 000000 on (a file).
    `video_id` (default: the file's or folder's stem) is the results' video_id: give the
    dataset's id to score results.json against its ground truth. `on_frame(VideoFrame)`, if
    given, sees each frame (not kept). Returns the `VideoSummary`.
    """
    from eomt.deploy.predictor import _write_image

    require_video_model(predictor.model, predictor.cfg)
    source = source if isinstance(source, VideoSource) else VideoSource(source, frame_rate)
    stream = VideoStream(predictor, task, max_tracks)
    task = stream.task
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if task.folder:
        (output_dir / task.folder).mkdir(exist_ok=True)
    video_id = source.path.stem if video_id is None else video_id
    categories = predictor.categories
    json_file = task.open_json(output_dir, categories) if task.name == "panoptic" else None
    spool = TrackSpool(output_dir / SPOOL_NAME) if task.name == "instance" else None
    video = OverlayVideo(output_dir / "overlay.mp4", source.frame_rate) if overlay else None
    summary = VideoSummary()
    size = None
    bar = tqdm(total=source.frame_count, desc="video", unit="frame", disable=not progress)
    start = time.perf_counter()
    try:
        for name, image in source:
            if size is None:
                size = tuple(image.shape[-2:])
            elif tuple(image.shape[-2:]) != size:
                raise BadSampleError(
                    f"{source.path}: frame {name} is {image.shape[-1]}x{image.shape[-2]}, the "
                    f"first was {size[1]}x{size[0]}: the frames of a video share one size",
                    source.path,
                )
            frame = stream.predict(image)
            summary.model_ms.append(1000 * frame.model_seconds)
            picture = to_uint8(image) if (overlay or task.folder) else None
            if task.name == "instance":
                spool.add(frame.query_masks)
            else:
                file_name = source.files[frame.index].name if source.files else f"{name}.png"
                result = frame.result
                if task.name == "panoptic":
                    keys = ("id", "label", "category_id", "isthing", "score")
                    result = (result[0], [{k: s[k] for k in keys} for s in result[1]])
                pngs, entries = task.image_outputs(
                    picture,
                    result,
                    {"id": name, "file_name": file_name},
                    name,
                    categories,
                    False,
                    score_threshold,
                )
                _write_image(output_dir, name, pngs, json_file, entries)
            if video is not None:
                video.write(overlay_picture(picture, task.name, frame, categories, score_threshold))
            summary.frames += 1
            bar.update(1)
            if on_frame is not None:
                on_frame(frame)
        if not summary.frames:
            raise BadSampleError(f"{source.path}: no frames", source.path)
        if spool is not None:
            path = output_dir / "results.json"
            path.write_text(json.dumps(video_tracks(stream, spool, video_id)))
            summary.files["results.json"] = path
            spool.remove()
            spool = None
        if json_file is not None:
            summary.files["panoptic.json"] = json_file.close()
            json_file = None
        if video is not None:
            video.close()
            summary.files["overlay.mp4"] = video.path
            video = None
    except BaseException:
        # No partial results.json, panoptic.json or overlay.mp4 (the PNGs written stay).
        for leftover in (json_file, video):
            if leftover is not None:
                leftover.discard()
        if spool is not None:
            spool.remove()
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    summary.info = {
        "source": str(source.path),
        "kind": source.kind,
        "video_id": video_id,
        "task": task.name,
        "frames": summary.frames,
        "height": size[0],
        "width": size[1],
        "frame_rate": source.frame_rate,
        "seconds": round(summary.seconds, 3),
        "frames_per_second": round(summary.fps, 3),
        "model_frames_per_second": round(summary.model_fps, 3),
        "model_ms_median": round(statistics.median(summary.model_ms), 3),
        "device": str(predictor.device),
        **predictor.forward.describe(),
        "ids": IDS_RULE[task.name],
        "scores": SCORES_RULE,
    }
    path = output_dir / "video.json"
    path.write_text(json.dumps(summary.info, indent=1) + "\n")
    summary.files["video.json"] = path
    return summary


IDS_RULE = {
    "panoptic": "segment id = query + 1 for a thing, K + 1 + class for stuff (K queries)",
    "instance": "a track is a (query, class) pair; 'query' names it in results.json",
    "semantic": "none (a class per pixel)",
}
SCORES_RULE = (
    "softmax of each query's class logits averaged over frames: over the whole video for "
    "results.json, over frames 0..t for frame t's outputs"
)


def video_tracks(stream: VideoStream, spool: TrackSpool, video_id) -> list[dict]:
    """The YouTube-VIS results of the video the stream has seen: the top tracks by the softmax
    of the class logits averaged over all its frames."""
    probs = stream.mean_class_logits().softmax(-1)
    chosen = top_tracks(probs, stream.max_tracks, stream.instance_classes)
    queries = chosen["queries"].tolist()
    masks = spool.tracks(sorted(set(queries)))
    categories = stream.predictor.categories
    return [
        {
            "video_id": video_id,
            "category_id": categories[label]["id"],
            "score": json_score(score),
            "segmentations": masks[query],
            "query": query,
        }
        for query, label, score in zip(
            queries, chosen["labels"].tolist(), chosen["scores"].tolist()
        )
    ]


def overlay_picture(
    picture: np.ndarray, task: str, frame: VideoFrame, categories, score_threshold: float
) -> np.ndarray:
    """The frame with its segments coloured by identity (a query keeps its colour), as the
    image overlays draw them but without the legend strip (its height would change)."""
    scale = upscale_factor(*picture.shape[:2])
    if task == "panoptic":
        seg, segments = frame.result
        by_label = [{**s, "category_id": s["label"]} for s in segments]
        drawn = draw_panoptic(picture, seg.cpu().numpy(), by_label, categories)
    elif task == "semantic":
        drawn = draw_semantic(picture, frame.result.cpu().numpy(), categories)
    else:
        result = frame.result
        seg = np.zeros(picture.shape[:2], dtype=np.int64)
        segments = {}
        order = sorted(range(len(result["scores"])), key=lambda i: float(result["scores"][i]))
        for i in order:  # the best drawn last, on top
            if float(result["scores"][i]) < score_threshold:
                continue
            query = int(result["queries"][i])
            seg[result["masks"][i].cpu().numpy()] = query + 1
            segments[query + 1] = {
                "id": query + 1,
                "category_id": int(result["labels"][i]),
                "isthing": 1,
            }
        present = set(np.unique(seg).tolist())
        kept = [s for i, s in segments.items() if i in present]
        drawn = draw_panoptic(picture, seg, kept, categories)
    return drawn[: scale * picture.shape[0]]
