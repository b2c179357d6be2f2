"""Evaluate segmentation predictions saved on disk against ground truth.

    python tools/evaluate.py panoptic --gt-json panoptic_val2017.json --gt-dir panoptic_val2017 \
        --pred-json predictions.json --pred-dir predictions [--json] [--workers N]
    python tools/evaluate.py semantic --gt-dir annotations/validation --pred-dir predictions \
        --num-classes 150 --label-offset 1 [--class-names names.txt] [--output-dir D] [--json]
    python tools/evaluate.py instance --gt-json instances_val2017.json \
        --pred-json segm_results.json [--json]

panoptic: COCO panoptic format on both sides (segment-id PNGs and a JSON); the rules and the
numbers of the COCO panoptic API's pq_compute. As there, every ground-truth image needs a
prediction; predictions of other images are ignored.
semantic: single-channel label PNGs matched by file name (gt-dir/X.png with pred-dir/X.png, for
every X.png in gt-dir), the same encoding on both sides: value v is class v - label_offset, the
ignore value and values outside the classes are ignored in the ground truth (and refused in a
prediction where the ground truth is not ignored).
instance: COCO instance ground truth and a COCO results file (image_id, category_id, RLE
segmentation, score), mask AP by pycocotools' COCOeval. A "bbox" in a result is dropped, so that
a detection's area (which sorts it into small / medium / large) is its mask's.

Predictions are matched to the ground truth by image id: tools/predict.py writes its ids with
--coco-json GT_JSON (without, its ids are file stems, which match no ground-truth id).

Every number is a percentage (pq_compute returns fractions and prints percentages). --json
prints a single JSON object instead of the tables (NaN, for a class without ground truth, as
null).
"""

import argparse
import contextlib
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from eomt.evaluation import PanopticEvaluator, SemanticEvaluator
from eomt.evaluation.instance import SUMMARY_KEYS, coco_mask_ap
from eomt.evaluation.panoptic_io import load_panoptic_json

PANOPTIC_GROUPS = (("All", ""), ("Things", "_th"), ("Stuff", "_st"))


def _load_json(path: str | Path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    with open(path) as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error


def _require_dir(path: str | Path) -> Path:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"folder not found: {path}")
    return Path(path)


def _check_image_ids(pred_ids, gt_ids, pred_json: str, gt_json: str) -> None:
    """Predictions named by file stem (tools/predict.py without --coco-json) match no ground-truth
    image id: say so, rather than a missing prediction or a score of 0."""
    pred_ids = set(pred_ids)
    if any(isinstance(i, str) for i in pred_ids) and pred_ids.isdisjoint(gt_ids):
        example = sorted(map(str, pred_ids))[0]
        raise ValueError(
            f"{pred_json}: its image ids (e.g. {example!r}) match none of {gt_json}: the "
            "predictions are named by file stem; run tools/predict.py with "
            f"--coco-json {gt_json} to give them the ground truth's image ids"
        )


# ----------------------------------------------------------------------------- panoptic


def _with_contiguous_labels(segments: list[dict], label_of: dict, where: str) -> list[dict]:
    converted = []
    for segment in segments:
        if segment["category_id"] not in label_of:
            raise ValueError(
                f"{where}: segment {segment['id']} has unknown category_id {segment['category_id']}"
            )
        converted.append({**segment, "category_id": label_of[segment["category_id"]]})
    return converted


def evaluate_panoptic(
    gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, workers: int | None = None
) -> dict:
    """PQ, SQ, RQ (percent) and N for All / Things / Stuff, and per class keyed by category id."""
    gt = load_panoptic_json(gt_json, ground_truth=True)
    pred = load_panoptic_json(pred_json, ground_truth=False)
    gt_dir, pred_dir = _require_dir(gt_dir), _require_dir(pred_dir)
    categories = gt["categories"]
    label_of = {category["id"]: label for label, category in enumerate(categories)}
    pred_by_image = {}
    for annotation in pred["annotations"]:
        if annotation["image_id"] in pred_by_image:
            raise ValueError(f"{pred_json}: image id {annotation['image_id']} appears twice")
        pred_by_image[annotation["image_id"]] = annotation
    gt_ids = [annotation["image_id"] for annotation in gt["annotations"]]
    _check_image_ids(pred_by_image, gt_ids, pred_json, gt_json)

    evaluator = PanopticEvaluator(categories, workers=workers)
    for gt_annotation in gt["annotations"]:
        image_id = gt_annotation["image_id"]
        if image_id not in pred_by_image:
            raise ValueError(
                f"{pred_json}: no prediction for image id {image_id} "
                f"({gt_annotation['file_name']} in {gt_json})"
            )
        pred_annotation = pred_by_image[image_id]
        evaluator.process_files(
            pred_dir / pred_annotation["file_name"],
            _with_contiguous_labels(
                pred_annotation["segments_info"], label_of, f"{pred_json}: image {image_id}"
            ),
            gt_dir / gt_annotation["file_name"],
            _with_contiguous_labels(
                gt_annotation["segments_info"], label_of, f"{gt_json}: image {image_id}"
            ),
            image_id,
        )
    results = evaluator.evaluate()

    summary = {
        group: {key: results[key + suffix] for key in ("PQ", "SQ", "RQ", "N")}
        for group, suffix in PANOPTIC_GROUPS
    }
    summary["per_class"] = {
        str(entry["id"]): {key: value for key, value in entry.items() if key != "id"}
        for entry in results["per_class"]
    }
    return summary


def format_panoptic(summary: dict) -> str:
    """The All / Things / Stuff table of pq_compute, then one row per class."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
    for group, _ in PANOPTIC_GROUPS:
        row = summary[group]
        lines.append(
            f"{group:10s}| {row['PQ']:6.1f} {row['SQ']:6.1f} {row['RQ']:6.1f} {row['N']:5d}"
        )
    lines += [
        "",
        f"{'id':>5s}  {'name':24s} {'kind':5s} {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} "
        f"{'TP':>6s} {'FP':>6s} {'FN':>6s}",
    ]
    for category_id, row in summary["per_class"].items():
        kind = "thing" if row["isthing"] else "stuff"
        lines.append(
            f"{category_id:>5s}  {row['name'][:24]:24s} {kind:5s} {row['PQ']:6.1f} "
            f"{row['SQ']:6.1f} {row['RQ']:6.1f} {row['TP']:6d} {row['FP']:6d} {row['FN']:6d}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- semantic


def _read_label_png(path: Path, num_classes: int, ignore_index: int, label_offset: int):
    """Contiguous labels (H, W) int64, -1 where ignored."""
    with Image.open(path) as png:
        raw = np.asarray(png).astype(np.int64)
    if raw.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label PNG, got shape {raw.shape}")
    labels = raw - label_offset
    labels[(raw == ignore_index) | (labels < 0) | (labels >= num_classes)] = -1
    return labels


def read_class_names(path: str | Path, num_classes: int) -> list[str]:
    """One class name per line."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(names) != num_classes:
        raise ValueError(f"{path}: {len(names)} class names for --num-classes {num_classes}")
    return names


def evaluate_semantic(
    gt_dir: str,
    pred_dir: str,
    num_classes: int,
    ignore_index: int = 255,
    label_offset: int = 0,
    class_names: list[str] | None = None,
    output_dir: str | None = None,
) -> dict:
    """mIoU, fwIoU, mACC, pACC and per-class IoU / ACC (percent) over gt_dir's label PNGs."""
    gt_dir, pred_dir = _require_dir(gt_dir), _require_dir(pred_dir)
    gt_paths = sorted(gt_dir.glob("*.png"))
    if not gt_paths:
        raise FileNotFoundError(f"no *.png label files in {gt_dir}")
    names = class_names or [str(label) for label in range(num_classes)]
    evaluator = SemanticEvaluator(num_classes, names, ignore_index=-1)
    for gt_path in gt_paths:
        pred_path = pred_dir / gt_path.name
        if not pred_path.is_file():
            raise FileNotFoundError(f"no prediction {pred_path} for {gt_path}")
        gt = _read_label_png(gt_path, num_classes, ignore_index, label_offset)
        pred = _read_label_png(pred_path, num_classes, ignore_index, label_offset)
        if pred.shape != gt.shape:
            raise ValueError(f"{pred_path} has size {pred.shape} but {gt_path} has {gt.shape}")
        try:
            evaluator.process(pred, gt)
        except ValueError as error:
            raise ValueError(
                f"{pred_path}: {error} (-1: the ignore value or a value outside the classes "
                "after --label-offset)"
            ) from error
    results = evaluator.evaluate()
    if output_dir:
        evaluator.save(output_dir)
    summary = {key: results[key] for key in ("mIoU", "fwIoU", "mACC", "pACC")}
    summary["per_class"] = [
        {"name": name, "IoU": iou, "ACC": accuracy}
        for name, iou, accuracy in zip(names, results["per_class_iou"], results["per_class_acc"])
    ]
    return summary


def format_semantic(summary: dict) -> str:
    lines = [f"{'class':24s} {'IoU':>7s} {'ACC':>7s}"]
    for row in summary["per_class"]:
        lines.append(f"{row['name'][:24]:24s} {row['IoU']:7.2f} {row['ACC']:7.2f}")
    lines += [
        "",
        "  ".join(f"{key} {summary[key]:.2f}" for key in ("mIoU", "fwIoU", "mACC", "pACC")),
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- instance


def _checked_results(predictions, coco_gt: COCO, pred_json: str, gt_json: str) -> list[dict]:
    """The results with every field COCOeval reads checked, "bbox" dropped."""
    if not isinstance(predictions, list):
        raise ValueError(f"{pred_json}: expected a JSON list of results")
    pred_ids = [result.get("image_id") for result in predictions if isinstance(result, dict)]
    _check_image_ids(pred_ids, coco_gt.imgs, pred_json, gt_json)
    checked = []
    for index, result in enumerate(predictions):
        where = f"{pred_json}: result {index}"
        missing = [
            k for k in ("image_id", "category_id", "segmentation", "score") if k not in result
        ]
        if missing:
            raise ValueError(f"{where} lacks the key(s) {missing}")
        image = coco_gt.imgs.get(result["image_id"])
        if image is None:
            raise ValueError(f"{where}: image_id {result['image_id']} is not in the ground truth")
        if result["category_id"] not in coco_gt.cats:
            raise ValueError(f"{where}: unknown category_id {result['category_id']}")
        segmentation = result["segmentation"]
        if not isinstance(segmentation, dict) or not {"size", "counts"} <= segmentation.keys():
            raise ValueError(f"{where}: segmentation must be an RLE dict with size and counts")
        if list(segmentation["size"]) != [image["height"], image["width"]]:
            raise ValueError(
                f"{where}: mask size {segmentation['size']} differs from image "
                f"{result['image_id']}'s [{image['height']}, {image['width']}]"
            )
        checked.append({key: value for key, value in result.items() if key != "bbox"})
    return checked


def evaluate_instance(gt_json: str, pred_json: str) -> tuple[dict, str]:
    """The 12 COCO mask AP / AR numbers and per-class AP (percent), and COCOeval's summary."""
    dataset = _load_json(gt_json)
    if not isinstance(dataset, dict) or not {"images", "annotations", "categories"} <= set(dataset):
        raise ValueError(f"{gt_json}: a COCO instance JSON needs images, annotations, categories")
    coco_gt = COCO()
    coco_gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    predictions = _checked_results(_load_json(pred_json), coco_gt, pred_json, gt_json)
    results, coco_summary = coco_mask_ap(coco_gt, predictions)
    summary = {key: results[key] for key in SUMMARY_KEYS}
    summary["per_class"] = {
        str(entry["id"]): {"name": entry["name"], "AP": entry["AP"]}
        for entry in results["per_class"]
    }
    return summary, coco_summary


def format_instance(summary: dict, coco_summary: str) -> str:
    """COCOeval's 12-line summary (fractions, as pycocotools prints it), then AP per class."""
    lines = [coco_summary, "", f"{'id':>5s}  {'name':24s} {'AP':>6s}"]
    for category_id, row in summary["per_class"].items():
        lines.append(f"{category_id:>5s}  {row['name'][:24]:24s} {row['AP']:6.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def _json_ready(value):
    """NaN -> None, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tasks = parser.add_subparsers(dest="task", required=True)

    panoptic = tasks.add_parser("panoptic", help="PQ as the COCO panoptic API's pq_compute")
    panoptic.add_argument("--gt-json", required=True, help="COCO panoptic ground-truth JSON")
    panoptic.add_argument("--gt-dir", required=True, help="folder of ground-truth PNGs")
    panoptic.add_argument("--pred-json", required=True, help="COCO panoptic result JSON")
    panoptic.add_argument("--pred-dir", required=True, help="folder of predicted PNGs")
    panoptic.add_argument(
        "--workers", type=int, help="worker processes; 0: none (default: min(8, CPU count))"
    )

    semantic = tasks.add_parser("semantic", help="mIoU from folders of label PNGs")
    semantic.add_argument("--gt-dir", required=True, help="ground-truth label PNGs")
    semantic.add_argument("--pred-dir", required=True, help="predicted label PNGs, same names")
    semantic.add_argument("--num-classes", type=int, required=True)
    semantic.add_argument("--ignore-index", type=int, default=255, help="PNG value to ignore")
    semantic.add_argument(
        "--label-offset", type=int, default=0, help="class = PNG value - offset (ADE20K: 1)"
    )
    semantic.add_argument("--class-names", help="text file, one class name per line")
    semantic.add_argument(
        "--output-dir", help="write per_class.csv and the confusion matrix (.npy, .csv) there"
    )

    instance = tasks.add_parser("instance", help="mask AP by COCOeval")
    instance.add_argument("--gt-json", required=True, help="COCO instance ground-truth JSON")
    instance.add_argument("--pred-json", required=True, help="COCO results JSON (RLE masks)")

    for subparser in (panoptic, semantic, instance):
        subparser.add_argument(
            "--json", action="store_true", help="print one JSON object (percentages)"
        )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.task == "panoptic":
        summary = evaluate_panoptic(
            args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, args.workers
        )
        table = format_panoptic(summary)
    elif args.task == "semantic":
        names = args.class_names and read_class_names(args.class_names, args.num_classes)
        summary = evaluate_semantic(
            args.gt_dir,
            args.pred_dir,
            args.num_classes,
            args.ignore_index,
            args.label_offset,
            names,
            args.output_dir,
        )
        table = format_semantic(summary)
    else:
        summary, coco_summary = evaluate_instance(args.gt_json, args.pred_json)
        table = format_instance(summary, coco_summary)
    print(json.dumps(_json_ready(summary), allow_nan=False) if args.json else table)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
