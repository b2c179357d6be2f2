"""Segment images with a trained or released model: single images, batches, folders, globs."""

import glob
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from eomt.data import BadSampleError, BadSampleWarning, load_image
from eomt.data.categories import ade20k_categories, cityscapes_categories
from eomt.data.images import IMAGE_SUFFIXES, rgb_pixels
from eomt.deploy.runtime import FastForward, add_runtime_arguments, default_autocast
from eomt.deploy.tiling import overlap_pixels, tile_grid
from eomt.inference import resize_and_pad, restore_logits, to_uint8
from eomt.pictures import draw_query_masks
from eomt.tasks import get_task, infer
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
        # np.asarray(PIL image) is read-only, which torch.from_numpy warns about: copy it.
        image = torch.from_numpy(image if image.flags.writeable else image.copy())
        image = image.permute(2, 0, 1)
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
    elif not glob.has_magic(str(spec)):
        raise FileNotFoundError(f"{spec}: no such image or folder")
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

    With `tile` (pixels, at most the model's input size), images larger than a tile are
    predicted at full resolution in overlapping tiles (`eomt.deploy.tiling`; `overlap` in
    pixels, or as a fraction of the tile), `tile_batch` tiles per forward, and the tiles'
    results joined: panoptic segments and instances of one object across tile borders become
    one, each pixel's semantic label comes from one tile. The results keep the untiled form
    (an image no larger than a tile gives exactly the untiled result), except instances: each
    mask within its box, {"boxes" (M, 4) (x0, y0, x1, y1), "masks" [M (y1 - y0, x1 - x0)],
    "scores", "labels", "category_ids"}, best score first.
    """

    def __init__(
        self,
        model,
        cfg,
        categories: list[dict],
        device=None,
        tile: int | None = None,
        overlap: int | float = 0.25,
        tile_batch: int = 8,
        **runtime,
    ):
        self.cfg, self.categories = cfg, categories
        if tile is not None:
            largest = min(cfg.input.image_size)
            if not 0 < tile <= largest:
                raise ValueError(
                    f"tile {tile} must be in 1..{largest}: the model's input is "
                    f"{cfg.input.image_size[0]}x{cfg.input.image_size[1]}, and a larger tile "
                    "would be shrunk"
                )
            if tile_batch < 1:
                raise ValueError(f"tile_batch must be >= 1, got {tile_batch}")
            overlap = overlap_pixels(overlap, tile)
        self.tile, self.overlap, self.tile_batch = tile, overlap, tile_batch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        num_classes = getattr(model, "num_classes", len(categories))
        if len(categories) != num_classes:
            raise ValueError(f"{len(categories)} categories for a model of {num_classes} classes")
        # `runtime`: FastForward's compile_mode, sdpa_backend, weights_dtype and autocast; no
        # autocast given: the config's solver.amp where it applies, as the evaluation runs.
        if runtime.get("autocast") is None:
            weights_dtype = runtime.get("weights_dtype", "fp32")
            runtime["autocast"] = default_autocast(device, weights_dtype, cfg.solver.amp)
        self.forward = FastForward(model.to(device), **runtime)
        self.model = self.forward.model

    @classmethod
    def from_checkpoint(
        cls, path, device=None, categories=None, base_weights=None, image_size=None, **runtime
    ) -> "Predictor":
        """Any checkpoint `eomt.from_checkpoint` reads. Ours carry their config and class
        names; `categories` (a name or a JSON file, see `read_categories`) names the classes
        of weights that do not. `runtime`: the tiling and FastForward options of `Predictor`."""
        model, cfg, own_categories = load_model(path, base_weights, image_size)
        if categories is not None:
            own_categories = read_categories(categories)
        return cls(model, cfg, own_categories, device, **runtime)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, image, task: str | None = None):
        return self.predict([image], task)[0]

    def predict(self, images: list, task: str | None = None) -> list:
        """Results for a batch of images (see the class docstring) of any sizes."""
        task = get_task(task or self.cfg.task)
        tensors = [as_image_tensor(image) for image in images]
        if self.tile is None:
            return self._predict(tensors, task)
        return [self._predict_tiled(tensor, task) for tensor in tensors]

    def video_stream(self, task: str | None = None, max_tracks: int = 10):
        """A `VideoStream` (eomt/deploy/video.py) of a VidEoMT checkpoint: `.predict(frame)`
        for the frames of one video in order, the model's queries carried from frame to frame
        (query k is one identity over the video); a model without them is refused."""
        from eomt.deploy.video import VideoStream

        return VideoStream(self, task, max_tracks)

    def _predict(self, tensors: list[torch.Tensor], task) -> list:
        results = infer(self.forward, tensors, self.cfg, self.categories, [task.name])[-1]
        return [task.public(result[task.name], self.categories) for result in results]

    def _predict_tiled(self, image: torch.Tensor, task):
        height, width = image.shape[-2:]
        tiles = tile_grid(height, width, self.tile, self.overlap)

        def results():  # one batch of tiles at a time
            for start in range(0, len(tiles), self.tile_batch):
                batch = tiles[start : start + self.tile_batch]
                yield from self._predict([image[:, t.y0 : t.y1, t.x0 : t.x1] for t in batch], task)

        return task.stitch(tiles, results(), height, width, self.categories, self.cfg.test)

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
        model.set_attn_mask_probs([1.0] * model.num_query_blocks)
        try:
            predictions = self.forward(padded[None])
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
        # As the results name them (TASK_block<i>): the query block, EoMT's or PMT's, counted
        # from the first that sees the queries.
        names = [f"before query block {i}" for i in range(len(predictions) - 1)] + ["final"]
        return masks, classes, queries, names


def add_predictor_arguments(parser) -> None:
    """--weights, --categories, --base-weights, --image-size, --device and the runtime options
    (eomt/deploy/runtime.py), as the tools that load a Predictor take them."""
    parser.add_argument("--weights", required=True, help="checkpoint file or HF model folder")
    parser.add_argument(
        "--categories",
        help="class names: ade20k, ade20k_panoptic, cityscapes or a COCO-format JSON file "
        "(default: those in the checkpoint, else 'class N')",
    )
    parser.add_argument("--base-weights", help="DINOv3 backbone file of official delta weights")
    parser.add_argument(
        "--image-size", type=int, nargs=2, metavar=("H", "W"), help="input size of the model"
    )
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    add_runtime_arguments(
        parser, "the checkpoint's solver.amp on CUDA with fp32 weights; else none"
    )


def predictor_from_arguments(args, **options) -> Predictor:
    """The Predictor the arguments of `add_predictor_arguments` describe (`options`: tiling)."""
    return Predictor.from_checkpoint(
        args.weights,
        device=args.device,
        categories=args.categories,
        base_weights=args.base_weights,
        image_size=args.image_size,
        compile_mode=args.compile,
        sdpa_backend=args.sdpa_backend,
        weights_dtype=args.weights_dtype,
        autocast=args.autocast,
        **options,
    )


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


@dataclass
class PredictionSummary:
    """What `write_predictions` did with its images: `predicted` (written), `skipped` (could
    not be read, left out), `failed` (stopped the run) and, after a stop, those not reached;
    `files`: the written files other than per-image ones, by name."""

    total: int
    predicted: int = 0
    skipped: int = 0
    failed: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def not_reached(self) -> int:
        return self.total - self.predicted - self.skipped - self.failed

    def describe(self) -> str:
        """E.g. '2 predicted, 1 skipped, 0 failed' (and ', 3 not reached' after a stop)."""
        text = f"{self.predicted} predicted, {self.skipped} skipped, {self.failed} failed"
        return text + (f", {self.not_reached} not reached" if self.not_reached else "")


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
    on_batch=None,
) -> PredictionSummary:
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

    Each batch's images are read first and the readable ones predicted, so that an image that
    cannot be read (missing, truncated, not an image) never costs another its prediction. With
    `bad_images="stop"` such an image stops the run after every image before it is written
    (the JSON file completed with them); with "skip" it is left out, with a warning, and listed
    with its problem in skipped_images.txt. An output that cannot be written (a full disk)
    stops the run with an OSError naming it: that image's files are removed and the JSON file
    holds the images completed before it (`StreamedJson` keeps the room to complete it). The
    error that stops a run says how many images were predicted, skipped, failed and not
    reached, and carries them as its `summary`.

    Returns the `PredictionSummary`. `on_batch(images done, results)`, if given, sees each
    batch's results once written (for benchmarks).
    """
    if bad_images not in ("stop", "skip"):
        raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
    if batch_size < 1 or show_queries < 0:
        raise ValueError(
            f"batch_size must be >= 1 and show_queries >= 0, got {batch_size} and {show_queries}"
        )
    if images is not None and len(images) != len(paths):
        raise ValueError(f"{len(images)} image entries for {len(paths)} paths")
    task = get_task(task or predictor.cfg.task)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for folder in (task.folder, overlay and "overlay", show_queries and "queries"):
        if folder:
            (output_dir / folder).mkdir(parents=True, exist_ok=True)
    # Results go to disk as they come, not into lists: memory stays flat over any number of
    # images (tests/test_memory.py).
    json_file = task.open_json(output_dir, predictor.categories)
    file_names = [image["file_name"] for image in images] if images else [p.name for p in paths]
    names = unique_stems([Path(file_name) for file_name in file_names])
    image_ids = [image["id"] for image in images] if images else names
    summary = PredictionSummary(len(paths))
    skipped = []
    bar = tqdm(total=len(paths), desc="predict", unit="image", disable=not progress)
    try:
        for start in range(0, len(paths), batch_size):
            indices, batch, stop = [], [], None
            for index in range(start, min(start + batch_size, len(paths))):
                try:
                    batch.append(load_image(paths[index]))
                    indices.append(index)
                except BadSampleError as error:
                    if bad_images == "stop":  # the images before it are still predicted
                        stop = error
                        break
                    warnings.warn(f"image left out: {error}", BadSampleWarning, stacklevel=2)
                    skipped.append(str(error))
                    summary.skipped += 1
            results = predictor.predict(batch, task.name) if batch else []
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
                summary.predicted += 1
            if stop is not None:
                summary.failed += 1
                raise stop
            bar.update(min(batch_size, len(paths) - start))
            if on_batch is not None:
                on_batch(min(start + batch_size, len(paths)), results)
    except BadSampleError as error:
        kept = json_file.close() if json_file is not None else output_dir
        stopped = BadSampleError(
            f"{error}; stopped there: {summary.describe()} (the {summary.predicted} "
            f"predicted are in {kept}; --bad-images skip leaves such images out)",
            error.path,
        )
        stopped.summary = summary
        raise stopped from error
    except _OutputWriteError as failed:
        error = failed.__cause__
        summary.failed += 1
        if json_file is not None:
            kept = f"{json_file.close()} holds the {summary.predicted} images completed before it"
        else:
            kept = f"the {summary.predicted} images completed before it are in {output_dir}"
        stopped = OSError(
            error.errno,
            f"could not write {failed.path} ({error.strerror or error}); {kept} (this "
            f"image's files were removed); {summary.describe()}",
        )
        stopped.summary = summary
        raise stopped from error
    except BaseException:
        if json_file is not None:
            json_file.discard()
        raise
    finally:
        bar.close()
    if json_file is not None:
        summary.files[json_file.path.name] = json_file.close()
    if skipped:
        summary.files["skipped_images.txt"] = output_dir / "skipped_images.txt"
        summary.files["skipped_images.txt"].write_text("".join(f"{m}\n" for m in skipped))
    return summary


def _image_outputs(
    predictor, task, image, result, info, name, overlay, show_queries, score_threshold
) -> tuple[list, dict]:
    """One image's PNGs and JSON entries (see `Task.image_outputs`), with the queries' picture."""
    categories = predictor.categories
    picture = to_uint8(image)
    pngs, entries = task.image_outputs(
        picture, result, info, name, categories, overlay, score_threshold
    )
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
