"""Where each dataset's files lie under its root, as folders or as the official archives.

A layout names, per split, the pieces a dataset needs (images, annotations) with the places each
may be, first found wins, and builds the reader from them: layout(root, split, transforms).
`check_dataset` reports what a root holds and what is missing. datasets/README.md documents
the layouts.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from eomt.data.categories import (
    ade20k_categories,
    cityscapes_categories,
    cityscapes_category_classes,
    cityscapes_category_lut,
    cityscapes_label_lut,
    cityscapes_labels,
    distinct_color,
)
from eomt.data.coco_instance import COCOInstanceDataset
from eomt.data.coco_panoptic import COCOPanopticDataset
from eomt.data.files import DataPath, find_first
from eomt.data.images import IMAGE_SUFFIXES
from eomt.data.semantic import SemanticDataset
from eomt.data.synthetic import SYNTHETIC_CATEGORIES, synthetic_split_paths
from eomt.data.synthetic_video import synthetic_video_paths
from eomt.data.vipseg import VIPSegDataset
from eomt.data.vspw import VSPWDataset
from eomt.data.ytvis import YTVISDataset

SPLITS = ("train", "val")
COCO_PANOPTIC_ZIP = "panoptic_annotations_trainval2017.zip"
COCO_ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
ADE20K_FOLDER = "ADEChallengeData2016"
ADE20K_SPLIT_FOLDERS = {"train": "training", "val": "validation"}


@dataclass(frozen=True)
class Layout:
    """The pieces of one dataset format and where they lie under a root.

    pieces: the files the format reads, among images (a folder), annotations (a COCO JSON),
    masks (a folder of panoptic segment-id PNGs or semantic label PNGs) and classes (a class
    list). places(split) -> {piece: candidate paths relative to the root, first found
    wins}; None for a format without a place of its own (every piece is given). build({piece:
    DataPath}, transforms, bad_samples="stop", **options) -> the dataset (bad_samples: the
    policy of eomt.data.bad_samples; options: the cfg.dataset keys named in `options`).
    full_sizes: images per official split. video: the reader's items are clips / videos
    (build also takes `clip_sampler`, a `ClipSampler` for training clips, None for whole
    videos)."""

    pieces: tuple[str, ...]
    places: Callable[[str], dict[str, tuple[str, ...]]] | None
    build: Callable[..., Dataset]
    full_sizes: dict[str, int] = field(default_factory=dict)
    hint: str = ""
    options: tuple[str, ...] = ()
    video: bool = False

    def locate(
        self, root: str | Path, split: str, given: dict[str, DataPath] | None = None
    ) -> dict[str, DataPath]:
        """Each piece: the path in `given`, else the first of the layout's places under the
        root that exists."""
        found = {}
        for piece in self.pieces:
            if given and piece in given:
                found[piece] = given[piece]
                continue
            if self.places is None:
                raise ValueError(f"{piece} of split '{split}' not given")
            candidates = self.places(split)[piece]
            path = find_first(root, candidates)
            if path is None:
                raise FileNotFoundError(
                    f"{root}: {piece} of split '{split}' not found; looked for "
                    + ", ".join(candidates)
                    + (f". {self.hint}" if self.hint else "")
                )
            found[piece] = path
        return found

    def __call__(
        self,
        root: str | Path,
        split: str,
        transforms: Callable | None,
        bad_samples: str = "stop",
        given: dict[str, DataPath] | None = None,
        **options,
    ) -> Dataset:
        return self.build(self.locate(root, split, given), transforms, bad_samples, **options)


def _official_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"dataset split '{split}' is not one of {SPLITS}")
    return split


def _synthetic_places(kind: str) -> Callable[[str], dict[str, tuple[str, ...]]]:
    def places(split: str) -> dict[str, tuple[str, ...]]:
        paths = synthetic_split_paths("", split)
        annotations = {"panoptic": "panoptic_json", "instance": "instance_json"}.get(kind)
        masks = {"panoptic": "panoptic_png_dir", "semantic": "semantic_dir"}.get(kind)
        found = {"images": (str(paths["image_dir"]),)}
        if annotations:
            found["annotations"] = (str(paths[annotations]),)
        if masks:
            found["masks"] = (str(paths[masks]),)
        return found

    return places


def _coco_places(split: str) -> dict[str, tuple[str, ...]]:
    s = f"{_official_split(split)}2017"
    return {
        "images": (s, f"{s}.zip/{s}"),
        "annotations": (
            f"annotations/panoptic_{s}.json",
            f"{COCO_PANOPTIC_ZIP}/annotations/panoptic_{s}.json",
        ),
        "masks": (
            f"annotations/panoptic_{s}",
            f"panoptic_{s}",
            f"annotations/panoptic_{s}.zip/panoptic_{s}",
            f"{COCO_PANOPTIC_ZIP}/annotations/panoptic_{s}.zip/panoptic_{s}",
        ),
    }


def _coco_instance_places(split: str) -> dict[str, tuple[str, ...]]:
    s = f"{_official_split(split)}2017"
    return {
        "images": (s, f"{s}.zip/{s}"),
        "annotations": (
            f"annotations/instances_{s}.json",
            f"{COCO_ANNOTATIONS_ZIP}/annotations/instances_{s}.json",
        ),
    }


def ade20k_folder_candidates(split: str, folder: str) -> tuple[str, ...]:
    """Where ADEChallengeData2016/<folder>/<training|validation> may be under the root."""
    inner = f"{ADE20K_FOLDER}/{folder}/{ADE20K_SPLIT_FOLDERS[_official_split(split)]}"
    return (inner, f"{ADE20K_FOLDER}.zip/{inner}")


def _ade20k_semantic_places(split: str) -> dict[str, tuple[str, ...]]:
    return {
        "images": ade20k_folder_candidates(split, "images"),
        "masks": ade20k_folder_candidates(split, "annotations"),
    }


def _ade20k_panoptic_places(split: str) -> dict[str, tuple[str, ...]]:
    return {
        "images": ade20k_folder_candidates(split, "images"),
        "annotations": (f"ade20k_panoptic_{split}.json",),
        "masks": (
            f"ade20k_panoptic_{split}",
            f"ade20k_panoptic_{split}.zip/ade20k_panoptic_{split}",
        ),
    }


def _cityscapes_places(split: str) -> dict[str, tuple[str, ...]]:
    split = _official_split(split)
    return {
        "images": (f"leftImg8bit/{split}", f"leftImg8bit_trainvaltest.zip/leftImg8bit/{split}"),
        "masks": (f"gtFine/{split}", f"gtFine_trainvaltest.zip/gtFine/{split}"),
    }


def _panoptic(found: dict[str, DataPath], transforms, bad_samples: str = "stop") -> Dataset:
    return COCOPanopticDataset(
        found["images"], found["annotations"], found["masks"], transforms, bad_samples
    )


def _instance(found: dict[str, DataPath], transforms, bad_samples: str = "stop") -> Dataset:
    return COCOInstanceDataset(found["images"], found["annotations"], transforms, bad_samples)


def _synthetic_semantic(found: dict[str, DataPath], transforms, bad_samples="stop") -> Dataset:
    stuff_only = [{**category, "isthing": 0} for category in SYNTHETIC_CATEGORIES]
    return SemanticDataset(
        found["images"],
        found["masks"],
        stuff_only,
        transforms=transforms,
        known_values=[*range(len(SYNTHETIC_CATEGORIES)), 255],
        bad_samples=bad_samples,
    )


def _ade20k_semantic(found: dict[str, DataPath], transforms, bad_samples="stop") -> Dataset:
    # Pixel value 0 is unlabelled; 1..150 are the classes.
    categories = ade20k_categories(with_things=False)
    return SemanticDataset(
        found["images"],
        found["masks"],
        categories,
        label_offset=1,
        transforms=transforms,
        known_values=range(len(categories) + 1),
        bad_samples=bad_samples,
        categories_source="the ADE20K class table (eomt/data/categories.py)",
    )


def _cityscapes(categories: Callable[[], list[dict]], label_lut: Callable[[], list[int]], what):
    """A reader of Cityscapes' labelIds PNGs mapped through `label_lut()` to `categories()`,
    read from the Cityscapes label table when a reader is built (cityscapesscripts is needed
    for Cityscapes only)."""

    def read(found: dict[str, DataPath], transforms, bad_samples="stop") -> Dataset:
        return SemanticDataset(
            found["images"],
            found["masks"],
            categories(),
            image_suffix="_leftImg8bit.png",
            label_suffix="_gtFine_labelIds.png",
            transforms=transforms,
            label_lut=label_lut(),
            known_values=[label.id for label in cityscapes_labels() if label.id >= 0],
            bad_samples=bad_samples,
            categories_source=f"the {what} of the Cityscapes label table (cityscapesscripts)",
        )

    return read


_cityscapes_semantic = _cityscapes(cityscapes_categories, cityscapes_label_lut, "train ids")
# The same files labelled with the 8 categories.
_cityscapes_category_semantic = _cityscapes(
    cityscapes_category_classes, cityscapes_category_lut, "categories"
)


def _own_semantic(
    found: dict[str, DataPath], transforms, bad_samples="stop", label_offset: int = 0
) -> Dataset:
    """Label PNGs `<image stem>.png` of class index + label_offset, 255 ignored, with a class
    list of one name per line; every class is stuff, as semantic targets merge instances."""
    categories = read_class_list(found["classes"])
    return SemanticDataset(
        found["images"],
        found["masks"],
        categories,
        label_offset=label_offset,
        image_suffix=IMAGE_SUFFIXES,
        transforms=transforms,
        known_values=[*range(len(categories) + label_offset), 255],
        bad_samples=bad_samples,
        categories_source=str(found["classes"]),
    )


def read_class_list(path: DataPath) -> list[dict]:
    """A text file of class names, one per line (blank lines ignored), in label order."""
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: a class list is a UTF-8 text file ({error})") from error
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"{path}: no class names (one per line)")
    return [
        {"id": index, "name": name, "isthing": 0, "color": distinct_color(index)}
        for index, name in enumerate(names)
    ]


def _ytvis_places(split: str) -> dict[str, tuple[str, ...]]:
    """YouTube-VIS 2019 / 2021 under their root (the authors' ytvis_20xx/): train/JPEGImages
    and train.json, valid/JPEGImages and valid.json (val: the official "valid" split)."""
    folder = {"train": "train", "val": "valid"}[_official_split(split)]
    return {"images": (f"{folder}/JPEGImages",), "annotations": (f"{folder}.json",)}


def _ovis_places(split: str) -> dict[str, tuple[str, ...]]:
    """OVIS under its root: train/ (the frames' folders) and annotations_train.json, valid/
    and annotations_valid.json (the files as OVIS distributes them)."""
    folder = {"train": "train", "val": "valid"}[_official_split(split)]
    return {"images": (folder,), "annotations": (f"annotations_{folder}.json",)}


def _vipseg_places(split: str) -> dict[str, tuple[str, ...]]:
    """VIPSeg at 720p under its root (the authors' VIPSeg_720P/): images/, panomasksRGB/ and
    panoptic_gt_VIPSeg_{train,val}.json (datasets/utils/vipseg_change2_720p.py makes them)."""
    split = _official_split(split)
    return {
        "images": ("images",),
        "annotations": (f"panoptic_gt_VIPSeg_{split}.json",),
        "masks": ("panomasksRGB",),
    }


def _vspw_places(split: str) -> dict[str, tuple[str, ...]]:
    """VSPW at 480p under its root (VSPW_480p/): data/ (each video's origin/ and mask/) and
    the split's video list, {train,val}.txt (its "annotations")."""
    return {"images": ("data",), "annotations": (f"{_official_split(split)}.txt",)}


def _synthetic_video_places(kind: str) -> Callable[[str], dict[str, tuple[str, ...]]]:
    def places(split: str) -> dict[str, tuple[str, ...]]:
        paths = synthetic_video_paths("", split)
        if kind == "vis":
            return {
                "images": (str(paths["ytvis"]["image_dir"]),),
                "annotations": (str(paths["ytvis"]["json_file"]),),
            }
        if kind == "vps":
            return {
                "images": (str(paths["vipseg"]["image_dir"]),),
                "annotations": (str(paths["vipseg"]["json_file"]),),
                "masks": (str(paths["vipseg"]["png_dir"]),),
            }
        return {
            "images": (str(paths["vspw"]["data_dir"]),),
            "annotations": (str(paths["vspw"]["split_file"]),),
        }

    return places


def _ytvis(found: dict[str, DataPath], transforms, bad_samples="stop", clip_sampler=None):
    return YTVISDataset(
        found["images"], found["annotations"], clip_sampler, transforms, bad_samples
    )


def _vipseg(found: dict[str, DataPath], transforms, bad_samples="stop", clip_sampler=None):
    return VIPSegDataset(
        found["images"], found["annotations"], found["masks"], clip_sampler, transforms, bad_samples
    )


def _vspw(categories=None):
    def read(found: dict[str, DataPath], transforms, bad_samples="stop", clip_sampler=None):
        return VSPWDataset(
            found["images"], found["annotations"], categories, clip_sampler, transforms, bad_samples
        )

    return read


COCO_SIZES = {"train": 118287, "val": 5000}
ADE20K_SIZES = {"train": 20210, "val": 2000}
PANOPTIC_PIECES = ("images", "annotations", "masks")
INSTANCE_PIECES = ("images", "annotations")
SEMANTIC_PIECES = ("images", "masks")

# dataset.name -> layout(root, split, transforms) building the dataset of a split.
DATASET_LAYOUTS = {
    "synthetic_panoptic": Layout(PANOPTIC_PIECES, _synthetic_places("panoptic"), _panoptic),
    "synthetic_instance": Layout(INSTANCE_PIECES, _synthetic_places("instance"), _instance),
    "synthetic_semantic": Layout(
        SEMANTIC_PIECES, _synthetic_places("semantic"), _synthetic_semantic
    ),
    "coco_panoptic": Layout(PANOPTIC_PIECES, _coco_places, _panoptic, COCO_SIZES),
    "coco_instance": Layout(INSTANCE_PIECES, _coco_instance_places, _instance, COCO_SIZES),
    "ade20k_semantic": Layout(
        SEMANTIC_PIECES, _ade20k_semantic_places, _ade20k_semantic, ADE20K_SIZES
    ),
    "ade20k_panoptic": Layout(
        PANOPTIC_PIECES,
        _ade20k_panoptic_places,
        _panoptic,
        ADE20K_SIZES,
        hint="Make the panoptic annotations with: python datasets/prepare_ade20k_panoptic.py ROOT",
    ),
    "cityscapes_semantic": Layout(
        SEMANTIC_PIECES, _cityscapes_places, _cityscapes_semantic, {"train": 2975, "val": 500}
    ),
    "cityscapes_categories": Layout(
        SEMANTIC_PIECES,
        _cityscapes_places,
        _cityscapes_category_semantic,
        {"train": 2975, "val": 500},
    ),
    # Videos (model.name videomt, task vis): clips for training, whole videos for evaluation.
    "ytvis": Layout(INSTANCE_PIECES, _ytvis_places, _ytvis, {"train": 2238}, video=True),
    "ovis": Layout(INSTANCE_PIECES, _ovis_places, _ytvis, {"train": 607}, video=True),
    "vipseg": Layout(PANOPTIC_PIECES, _vipseg_places, _vipseg, {"train": 2806}, video=True),
    "vspw": Layout(INSTANCE_PIECES, _vspw_places, _vspw(), {"train": 2806}, video=True),
    "synthetic_video_vis": Layout(
        INSTANCE_PIECES, _synthetic_video_places("vis"), _ytvis, video=True
    ),
    "synthetic_video_vps": Layout(
        PANOPTIC_PIECES, _synthetic_video_places("vps"), _vipseg, video=True
    ),
    "synthetic_video_vss": Layout(
        INSTANCE_PIECES,
        _synthetic_video_places("vss"),
        _vspw(SYNTHETIC_CATEGORIES),
        video=True,
    ),
    # Your own label PNGs: every piece comes from the config.
    "semantic": Layout(
        (*SEMANTIC_PIECES, "classes"), None, _own_semantic, options=("label_offset",)
    ),
}


def _listed_files(dataset: Dataset) -> list[DataPath]:
    """The files a COCO-format dataset's JSON refers to (semantic readers check theirs)."""
    if isinstance(dataset, COCOPanopticDataset):
        return [dataset.image_dir / image["file_name"] for image in dataset.images] + [
            dataset.png_dir / annotation["file_name"]
            for annotation in dataset.annotations
            if annotation is not None
        ]
    if isinstance(dataset, COCOInstanceDataset):
        return [dataset.image_dir / image["file_name"] for image in dataset.coco.imgs.values()]
    return []


def check_dataset(
    name: str,
    root: str | Path,
    splits: tuple[str, ...] = SPLITS,
    num_samples: int = 2,
    report: Callable[[str], None] = print,
    given: dict[str, dict[str, DataPath]] | None = None,
    options: dict | None = None,
) -> bool:
    """Report, per split, where each piece was found or that it is missing, whether every file
    the annotations list is there, and whether a few samples load. True if nothing failed.

    given: {split: {piece: path}} of pieces given (by a config) instead of the layout's places;
    options: the layout's build options (see `Layout.options`)."""
    if name not in DATASET_LAYOUTS:
        raise ValueError(f"unknown dataset '{name}', expected one of {sorted(DATASET_LAYOUTS)}")
    layout, root, ok = DATASET_LAYOUTS[name], Path(root), True
    for split in splits:
        report(f"{name} / {split}")
        found = {}
        split_given = (given or {}).get(split, {})
        for piece in layout.pieces:
            if piece in split_given:
                path = split_given[piece]
            elif layout.places is None:
                report(f"  MISSING {piece}: not given")
                continue
            else:
                candidates = layout.places(split)[piece]
                path = find_first(root, candidates)
                if path is None:
                    tried = ", ".join(str(root / candidate) for candidate in candidates)
                    report(f"  MISSING {piece}: none of {tried}")
                    continue
            report(f"  found   {piece}: {path}")
            found[piece] = path
        if len(found) < len(layout.pieces):
            ok = False
            if layout.hint:
                report(f"  {layout.hint}")
            continue
        try:
            dataset = layout.build(found, None, **(options or {}))
            missing = [path for path in _listed_files(dataset) if not path.is_file()]
            if missing:
                ok = False
                report(f"  MISSING {len(missing)} listed files, e.g. {missing[0]}")
            size = len(dataset)
            full = None if split_given else layout.full_sizes.get(split)
            unit = "videos" if layout.video else "images"
            report(
                f"  {size} {unit}, {len(dataset.categories)} classes"
                + (f" (the full split has {full} {unit})" if full not in (None, size) else "")
            )
            if size == 0:
                ok = False
            count = min(num_samples, size)
            for index in sorted({round(i * (size - 1) / max(1, count - 1)) for i in range(count)}):
                image, target = dataset[index]
                if layout.video:  # a video's frames (T, 3, H, W) and its tracks
                    report(
                        f"  sample {index}: video {target['video_id']}, {image.shape[0]} frames "
                        f"{image.shape[2]}x{image.shape[3]}, {len(target['labels'])} tracks"
                    )
                    continue
                report(
                    f"  sample {index}: {target['file_name']} {image.shape[1]}x{image.shape[2]}, "
                    f"{len(target['labels'])} masks"
                )
        except Exception as error:  # any reader failure is a finding to report
            ok = False
            report(f"  FAILED: {type(error).__name__}: {error}")
    return ok
