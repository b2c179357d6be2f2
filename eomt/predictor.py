"""Segment images with a trained or released model: single images, batches, folders, globs."""

import glob
import json
import os
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from eomt.data import BadSampleError, BadSampleWarning, load_image
from eomt.data.categories import ade20k_categories, cityscapes_categories
from eomt.data.images import IMAGE_SUFFIXES, rgb_pixels
from eomt.engine.inference import TASKS, autocast_for, infer, resize_and_pad, restore_logits
from eomt.evaluation.panoptic_io import id_to_rgb
from eomt.pictures import draw_instances, draw_query_masks, draw_semantic
from eomt.visualize import draw_panoptic
from eomt.weights import load_model

NAMED_CATEGORIES = {
    "ade20k": lambda: ade20k_categories(with_things=False),
    "ade20k_panoptic": lambda: ade20k_categories(with_things=True),
    "cityscapes": cityscapes_categories,
}


ACCEPTED_IMAGES = (
    "a path (str or Path), a PIL image, a numpy uint8 array (H, W, 3), a torch uint8 tensor "
    "(3, H, W) or a torch float tensor (3, H, W) with values in [0, 1]"
)


def as_image_tensor(image) -> torch.Tensor:
    """One of the ACCEPTED_IMAGES forms -> float32 (3, H, W) in [0, 1]; anything else is refused,
    as a layout or value range cannot be guessed safely (a uint8 tensor read as 0-255 floats,
    an (H, W, 3) tensor read as 3 rows)."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    if isinstance(image, Image.Image):
        image = rgb_pixels(image, "PIL image")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise TypeError(_refusal(f"a numpy {image.dtype} array {image.shape}"))
        image = torch.from_numpy(image).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(_refusal(f"a {type(image).__name__}"))
    if image.dim() != 3 or image.shape[0] != 3:
        raise TypeError(_refusal(f"a torch tensor of shape {tuple(image.shape)}"))
    if image.dtype == torch.uint8:
        return TF.to_dtype(image, torch.float32, scale=True)
    if not image.is_floating_point():
        raise TypeError(_refusal(f"a torch {image.dtype} tensor"))
    image = image.float()
    if not ((image >= 0) & (image <= 1)).all():
        raise ValueError(
            f"a float image tensor needs values in [0, 1], got [{float(image.min()):g}, "
            f"{float(image.max()):g}]: divide a 0-255 image by 255"
        )
    return image


def _refusal(what: str) -> str:
    return f"cannot use {what} as an image; accepted: {ACCEPTED_IMAGES}"


def find_images(spec: str | Path) -> list[Path]:
    """An image file, a folder (its images, not recursive) or a glob pattern -> sorted paths."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [Path(p) for p in glob.glob(str(spec), recursive=True)]
        files = [p for p in files if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found at {spec}")
    return sorted(files)


def read_categories(spec: str | Path) -> list[dict]:
    """Class metadata by name (ade20k, ade20k_panoptic, cityscapes) or from a COCO-format JSON
    file with "categories" (e.g. panoptic_val2017.json), in the file's order."""
    if str(spec) in NAMED_CATEGORIES:
        return NAMED_CATEGORIES[str(spec)]()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"categories: {spec} is neither a file nor one of {sorted(NAMED_CATEGORIES)}"
        )
    with open(path) as f:
        content = json.load(f)
    if "categories" not in content:
        raise ValueError(f"{path}: no 'categories' list")
    categories = []
    for index, category in enumerate(content["categories"]):
        if "id" not in category or "name" not in category:
            raise ValueError(f"{path}: category {index} lacks 'id' or 'name'")
        categories.append(
            {
                "id": category["id"],
                "name": category["name"],
                "isthing": int(category.get("isthing", 1)),
                "color": list(category.get("color", [(37 * index) % 256, 160, 200])),
            }
        )
    return categories


class Predictor:
    """`predictor(image, task)` -> the task's result for one image at its own size.

    An image is a path (str or Path), a PIL image, a numpy uint8 array (H, W, 3), a torch uint8
    tensor (3, H, W) or a torch float tensor (3, H, W) in [0, 1]; other forms are refused.

    panoptic: (segment map (H, W) int32, 0 = void; segments [{id, label, category_id, isthing,
    score}]); semantic: label map (H, W); instance: {masks (M, H, W), scores (M,), labels (M,),
    category_ids (M,)}. A label is a contiguous class index into `predictor.categories`, a
    category id the dataset's id of that class (`categories[label]["id"]`, as in the JSON
    files `write_predictions` writes). `predict(images, task)` does the same for a batch.
    """

    def __init__(self, model, cfg, categories: list[dict], device=None):
        self.cfg, self.categories = cfg, categories
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        num_classes = getattr(model, "num_classes", len(categories))
        if len(categories) != num_classes:
            raise ValueError(f"{len(categories)} categories for a model of {num_classes} classes")

    @classmethod
    def from_checkpoint(
        cls, path, device=None, categories=None, base_weights=None, image_size=None
    ) -> "Predictor":
        """Any checkpoint `eomt.from_checkpoint` reads. Ours carry their config and class
        names; `categories` (a name or a JSON file, see `read_categories`) names the classes
        of weights that do not."""
        model, cfg, own_categories = load_model(path, base_weights, image_size)
        if categories is not None:
            own_categories = read_categories(categories)
        return cls(model, cfg, own_categories, device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, image, task: str | None = None):
        return self.predict([image], task)[0]

    def predict(self, images: list, task: str | None = None) -> list:
        """Results for a batch of images (see the class docstring) of any sizes."""
        task = task or self.cfg.task
        if task not in TASKS:
            raise ValueError(f"unknown task '{task}', expected one of {TASKS}")
        tensors = [as_image_tensor(image) for image in images]
        results = infer(self.model, tensors, self.cfg, self.categories, [task])
        return [self._with_category_ids(task, result[task]) for result in results]

    def _with_category_ids(self, task: str, result):
        """Post-processing's result (contiguous labels, as the evaluators take them) -> the
        public one, which also names each class by the dataset's category id."""
        if task == "panoptic":
            seg, segments = result
            return seg, [
                {
                    "id": segment["id"],
                    "label": segment["category_id"],
                    "category_id": self.categories[segment["category_id"]]["id"],
                    "isthing": segment["isthing"],
                    "score": segment["score"],
                }
                for segment in segments
            ]
        if task == "instance":
            ids = torch.tensor([c["id"] for c in self.categories], device=result["labels"].device)
            return {**result, "category_ids": ids[result["labels"]]}
        return result

    @torch.no_grad()
    def query_predictions(self, image, num_queries: int = 4):
        """What the `num_queries` most confident queries predict before each query block and
        at the end, with masked attention on (every query masked, as early in training).

        Returns (mask logits (P, Q, H, W) at the image's size, class logits (P, Q, C+1),
        the query indices, a name per prediction).
        """
        tensor = as_image_tensor(image).to(self.device)
        size = tuple(self.cfg.input.image_size)
        padded, inner = resize_and_pad(tensor, size)
        model = self.model
        saved = model.masked_attn, model.attn_mask_probs.clone()
        model.masked_attn = "always"
        model.attn_mask_probs.fill_(1.0)
        try:
            with autocast_for(self.device, self.cfg.solver.amp):
                predictions = model(padded[None])
        finally:
            model.masked_attn = saved[0]
            model.attn_mask_probs.copy_(saved[1])
        final_scores = predictions[-1]["class_logits"][0].float().softmax(-1)[:, :-1].amax(-1)
        queries = final_scores.topk(min(num_queries, final_scores.numel())).indices.tolist()
        masks = torch.stack(
            [
                restore_logits(p["mask_logits"][0, queries].float(), inner, size, tensor.shape[-2:])
                for p in predictions
            ]
        )
        classes = torch.stack([p["class_logits"][0, queries].float() for p in predictions])
        first = len(model.backbone.blocks) - model.num_query_blocks
        names = [f"block {first + i}" for i in range(len(predictions) - 1)] + ["final"]
        return masks, classes, queries, names


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Float image (3, H, W) in [0, 1] -> uint8 (H, W, 3)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names: the file stems, numbered where two files share one."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        count = seen.get(path.stem, 0)
        seen[path.stem] = count + 1
        stems.append(path.stem if count == 0 else f"{path.stem}_{count}")
    return stems


def read_coco_images(json_path: str | Path, image_dir: str | Path) -> tuple[list[Path], list]:
    """The images of a COCO JSON (panoptic or instance, e.g. the ground truth) under
    `image_dir`: their paths (`image_dir` / file_name, found or not) and their "images"
    entries, in the file's order, for `write_predictions(..., images=...)`."""
    if not Path(image_dir).is_dir():
        raise NotADirectoryError(
            f"{image_dir} is not a folder; the images of {json_path} are found in one by file_name"
        )
    with open(json_path) as f:
        content = json.load(f)
    if not isinstance(content, dict) or not isinstance(content.get("images"), list):
        raise ValueError(f"{json_path}: no 'images' list")
    seen = set()
    for index, image in enumerate(content["images"]):
        if "id" not in image or "file_name" not in image:
            raise ValueError(f"{json_path}: images[{index}] lacks 'id' or 'file_name'")
        if image["id"] in seen:
            raise ValueError(f"{json_path}: image id {image['id']} appears twice")
        seen.add(image["id"])
    images = [{"id": i["id"], "file_name": i["file_name"]} for i in content["images"]]
    return [Path(image_dir, image["file_name"]) for image in images], images


def write_predictions(
    predictor: Predictor,
    paths: list[Path],
    output_dir: str | Path,
    task: str | None = None,
    batch_size: int = 4,
    overlay: bool = True,
    show_queries: int = 0,
    score_threshold: float = 0.5,
    progress: bool = True,
    bad_images: str = "stop",
    images: list[dict] | None = None,
) -> dict[str, Path]:
    """Predict `paths` in batches and write, under `output_dir`:

    panoptic: panoptic/<name>.png (segment ids as R + 256 G + 256^2 B) and panoptic.json
        (COCO panoptic result format, dataset category ids, plus each segment's score);
    semantic: semantic/<name>.png (contiguous labels; 16-bit above 255 classes);
    instance: instances.json (COCO results: RLE masks, boxes, scores);
    overlay/<name>.png with class names, outlines and a legend (instances above
    `score_threshold`), and with `show_queries` > 0, queries/<name>.png: what that many
    queries predict at each query block with masked attention on.

    Image ids: `images`, one COCO "images" entry ({"id", "file_name"}) per path (e.g. from
    `read_coco_images` of the ground truth), gives each image the entry's id and file name and
    <file_name stem> as <name>, as the COCO panoptic ground-truth PNGs: tools/evaluate.py then
    scores the outputs against that ground truth. Without, <name> is the file's stem (numbered
    where two share one) and the image id is that name, a string, which matches no dataset id.

    An image that cannot be read (missing, truncated, not an image) stops the run with
    `bad_images="stop"`, after the JSON file is completed with the images before it; with
    "skip" it is left out, with a warning, and listed with its problem in skipped_images.txt.
    An output that cannot be written (a full disk) stops the run with an OSError naming it:
    that image's files are removed and the JSON file holds the images completed before it
    (`StreamedJson` keeps the room to complete it). Returns the paths of the files other than
    per-image ones.
    """
    if bad_images not in ("stop", "skip"):
        raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
    if batch_size < 1 or show_queries < 0:
        raise ValueError(
            f"batch_size must be >= 1 and show_queries >= 0, got {batch_size} and {show_queries}"
        )
    if images is not None and len(images) != len(paths):
        raise ValueError(f"{len(images)} image entries for {len(paths)} paths")
    task = task or predictor.cfg.task
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    folders = {"panoptic": "panoptic", "semantic": "semantic"}
    if task in folders:
        (output_dir / folders[task]).mkdir(parents=True, exist_ok=True)
    if overlay:
        (output_dir / "overlay").mkdir(parents=True, exist_ok=True)
    if show_queries:
        (output_dir / "queries").mkdir(parents=True, exist_ok=True)
    # Results go to disk as they come, not into lists: memory stays flat over any number of
    # images (tests/test_memory.py).
    if task == "panoptic":
        json_file = StreamedJson(
            output_dir / "panoptic.json",
            "annotations",
            ("images",),
            {"categories": predictor.categories},
        )
    elif task == "instance":
        json_file = StreamedJson(output_dir / "instances.json")
    else:
        json_file = None
    file_names = [image["file_name"] for image in images] if images else [p.name for p in paths]
    names = unique_stems([Path(file_name) for file_name in file_names])
    image_ids = [image["id"] for image in images] if images else names
    skipped, completed = [], 0
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=not progress)
    try:
        for start in range(0, len(paths), batch_size):
            indices, batch = [], []
            for index in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append(load_image(paths[index]))
                    indices.append(index)
                except BadSampleError as error:
                    if bad_images == "stop":
                        raise
                    warnings.warn(f"image left out: {error}", BadSampleWarning, stacklevel=2)
                    skipped.append(str(error))
            results = predictor.predict(batch, task) if batch else []
            for index, image, result in zip(indices, batch, results):
                pngs, entries = _image_outputs(
                    predictor,
                    task,
                    image,
                    result,
                    {"id": image_ids[index], "file_name": file_names[index]},
                    names[index],
                    overlay,
                    show_queries,
                    score_threshold,
                )
                _write_image(output_dir, names[index], pngs, json_file, entries)
                completed += 1
            bar.update(min(batch_size, len(paths) - start))
    except BadSampleError as error:
        if json_file is not None:  # what was predicted before it is kept
            json_file.close()
        raise BadSampleError(
            f"{error}; the predictions of the images before it are in {output_dir} "
            "(bad_images='skip' leaves such images out)"
        ) from error
    except _OutputWriteError as failed:
        error = failed.__cause__
        if json_file is not None:
            kept = f"{json_file.close()} holds the {completed} images completed before it"
        else:
            kept = f"the {completed} images completed before it are in {output_dir}"
        raise OSError(
            error.errno,
            f"could not write {failed.path} ({error.strerror or error}); {kept} (this "
            "image's files were removed)",
        ) from error
    except BaseException:
        if json_file is not None:
            json_file.discard()
        raise
    finally:
        bar.close()
    written = {}
    if json_file is not None:
        written[json_file.path.name] = json_file.close()
    if skipped:
        written["skipped_images.txt"] = output_dir / "skipped_images.txt"
        written["skipped_images.txt"].write_text("".join(f"{m}\n" for m in skipped))
    return written


def _image_outputs(
    predictor, task, image, result, info, name, overlay, show_queries, score_threshold
) -> tuple[list, dict]:
    """One image's PNGs, as (folder, function giving the pixels) pairs drawn only when written,
    and its JSON entries ({list key: items}, see `StreamedJson.add`)."""
    categories = predictor.categories
    picture = to_uint8(image)
    pngs, entries = [], {}
    if task == "panoptic":
        seg, segments = result[0].cpu().numpy(), result[1]
        height, width = seg.shape
        entries = {
            "annotations": [_panoptic_annotation(info["id"], name, seg, segments)],
            "images": [{**info, "height": height, "width": width}],
        }
        pngs.append(("panoptic", partial(id_to_rgb, seg)))
        if overlay:  # the drawing code reads a segment's "category_id" as its label
            by_label = [{**segment, "category_id": segment["label"]} for segment in segments]
            pngs.append(("overlay", partial(draw_panoptic, picture, seg, by_label, categories)))
    elif task == "semantic":
        labels = result.cpu().numpy()
        dtype = np.uint8 if len(categories) <= 255 else np.uint16
        pngs.append(("semantic", partial(labels.astype, dtype)))
        if overlay:
            pngs.append(("overlay", partial(draw_semantic, picture, labels, categories)))
    else:
        result = {key: value.cpu() for key, value in result.items()}
        entries = {None: _instance_annotations(info["id"], result)}
        if overlay:
            drawing = partial(draw_instances, picture, result, categories, score_threshold)
            pngs.append(("overlay", drawing))
    if show_queries:
        pngs.append(
            (
                "queries",
                lambda: draw_query_masks(
                    picture, *predictor.query_predictions(image, show_queries), categories
                ),
            )
        )
    return pngs, entries


class _OutputWriteError(Exception):
    """An output of one image could not be written (the OSError is its cause)."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _write_image(output_dir: Path, name: str, pngs: list, json_file, entries: dict) -> None:
    """Write one image's PNGs, then its JSON entries, all or none: on an OSError the image's
    files are removed and _OutputWriteError names the file that failed."""
    written, target = [], None
    try:
        for folder, pixels in pngs:
            target = output_dir / folder / f"{name}.png"
            written.append(target)
            _save_png(target, pixels())
        if json_file is not None:
            target = json_file.path
            json_file.add(entries)
    except OSError as error:
        for path in written:
            path.unlink(missing_ok=True)
        raise _OutputWriteError(target) from error


def _save_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path)


# Room kept beyond the bytes that closing a StreamedJson appends: file systems allocate whole
# blocks (up to 64 KiB), so n bytes freed in one file may hold fewer in another.
RESERVE_MARGIN = 128 << 10


class StreamedJson:
    """A JSON file written as its list items come, without keeping them: byte for byte what
    `json.dump` writes of the whole, a list (`key` None) or an object of the list `key`, the
    lists `side_keys` and the `members` (JSON values known from the start), in that order.

    The items of `key` go straight into a temporary beside `path`, those of each side list into
    a part file; `close` appends the side lists and `members` and renames the temporary to
    `path`, which appears only then (an interrupted run leaves no truncated file). Writes are
    unbuffered, so what is on disk is known: an `add` that fails (a full disk) is truncated
    away and the file still closes into the items added before it. A reserve file as large as
    what closing appends (plus RESERVE_MARGIN), grown with the side lists, is deleted just
    before closing: closing needs no free space.
    """

    def __init__(
        self,
        path: str | Path,
        key: str | None = None,
        side_keys: tuple[str, ...] = (),
        members: dict | None = None,
    ):
        if key is None and (side_keys or members):
            raise ValueError("StreamedJson: a file that is one list has no other members")
        self.path, self.key, self.side_keys = Path(path), key, side_keys
        self._members = "".join(
            f", {json.dumps(name)}: {json.dumps(value)}" for name, value in (members or {}).items()
        )
        self._paths = {
            key: self.path.with_name(self.path.name + ".partial"),
            **{side: self.path.with_name(f"{self.path.name}.{side}.part") for side in side_keys},
        }
        self._reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._files, self._reserve, self._reserve_size = {}, None, 0
        self._sizes, self._counts = dict.fromkeys(self._paths, 0), dict.fromkeys(self._paths, 0)
        try:
            for name, part in self._paths.items():
                self._files[name] = open(part, "wb", buffering=0)
            self._reserve = open(self._reserve_path, "wb", buffering=0)
            self._append(key, ("[" if key is None else f"{{{json.dumps(key)}: [").encode())
            self._grow_reserve(self._closing_size() + RESERVE_MARGIN)
        except BaseException:
            self.discard()
            raise

    def add(self, items: dict) -> None:
        """Append items to their lists ({key: [item, ...]}, None the key of a file that is one
        list): all of them, or on an error none."""
        texts = {
            key: ((", " if self._counts[key] else "") + ", ".join(map(json.dumps, values))).encode()
            for key, values in items.items()
            if values
        }
        sizes, reserve_size = dict(self._sizes), self._reserve_size
        try:
            for key, text in texts.items():
                self._append(key, text)
            self._grow_reserve(sum(len(text) for key, text in texts.items() if key != self.key))
        except BaseException:
            for name, size in sizes.items():
                _truncate(self._files[name], size)
            _truncate(self._reserve, reserve_size)
            self._sizes, self._reserve_size = sizes, reserve_size
            raise
        for key, values in items.items():
            self._counts[key] += len(values)

    def close(self) -> Path:
        """Complete `path` and remove the temporary files; returns `path`."""
        try:
            self._reserve.close()
            self._reserve_path.unlink()
            self._append(self.key, b"]")
            for side in self.side_keys:
                self._append(self.key, f", {json.dumps(side)}: [".encode())
                self._files[side].close()
                with open(self._paths[side], "rb") as part:
                    while chunk := part.read(1 << 20):
                        self._append(self.key, chunk)
                self._append(self.key, b"]")
            if self.key is not None:
                self._append(self.key, f"{self._members}}}".encode())
            self._files[self.key].close()
            os.replace(self._paths[self.key], self.path)
        finally:
            self.discard()
        return self.path

    def discard(self) -> None:
        """Close and remove the temporary files."""
        for name, file in self._files.items():
            file.close()
            self._paths[name].unlink(missing_ok=True)
        if self._reserve is not None:
            self._reserve.close()
            self._reserve_path.unlink(missing_ok=True)

    def _closing_size(self) -> int:
        """The bytes `close` appends besides the items of the side lists."""
        if self.key is None:
            return len(b"]")
        lists = "".join(f", {json.dumps(side)}: []" for side in self.side_keys)
        return len(f"]{lists}{self._members}}}".encode())

    def _append(self, key, data: bytes) -> None:
        _write_all(self._files[key], data)
        self._sizes[key] += len(data)

    def _grow_reserve(self, size: int) -> None:
        # Random bytes: a compressing file system would store zeros in no space.
        _write_all(self._reserve, os.urandom(size))
        self._reserve_size += size


def _write_all(file, data: bytes) -> None:
    """Write all of `data` to an unbuffered file (a raw write may write part of it)."""
    view = memoryview(data)
    try:
        while view:
            view = view[file.write(view) :]
    except OSError as error:
        raise OSError(error.errno, error.strerror, file.name) from error


def _truncate(file, size: int) -> None:
    file.truncate(size)
    file.seek(size)


def _score(value: float) -> float:
    """9 significant digits: every float32 score keeps its own value, so the ranking of the
    JSON file is the model's (ties included) and its AP that of an evaluation in memory."""
    return float(f"{value:.9g}")


def _panoptic_annotation(image_id, name, seg, segments) -> dict:
    info = []
    for segment in segments:
        mask = seg == segment["id"]
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            continue
        info.append(
            {
                "id": int(segment["id"]),
                "category_id": segment["category_id"],
                "iscrowd": 0,
                "area": int(ys.size),
                "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                "score": _score(segment["score"]),
            }
        )
    return {"image_id": image_id, "file_name": f"{name}.png", "segments_info": info}


def _instance_annotations(image_id, result) -> list[dict]:
    masks = np.asfortranarray(result["masks"].numpy().transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(masks) if len(result["scores"]) else []
    annotations = []
    for rle, score, category_id in zip(
        rles, result["scores"].tolist(), result["category_ids"].tolist()
    ):
        annotations.append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "bbox": [round(v, 2) for v in mask_utils.toBbox(rle).tolist()],
                "score": _score(score),
            }
        )
    return annotations
