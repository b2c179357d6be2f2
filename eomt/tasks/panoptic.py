"""Panoptic segmentation: non-overlapping segments of thing and stuff classes, scored by PQ.

Results are (segment map (H, W) int32 with 0 = void, segments); written as COCO panoptic PNGs
(segment ids as R + 256 G + 256^2 B) and one COCO panoptic JSON, and read back from such files
by `evaluate_files` with the numbers of the COCO panoptic API's pq_compute.
"""

from functools import partial
from pathlib import Path

import numpy as np

from eomt.deploy.streamed_json import StreamedJson
from eomt.evaluation.files import check_image_ids, require_dir
from eomt.evaluation.panoptic import PanopticEvaluator, masks_to_panoptic
from eomt.evaluation.panoptic_io import id_to_rgb, load_panoptic_json
from eomt.pictures import draw_panoptic
from eomt.tasks.base import Task, json_score

GROUPS = (("All", ""), ("Things", "_th"), ("Stuff", "_st"))
PUBLIC_KEYS = ("id", "label", "category_id", "isthing", "score")  # of a predictor's segment


class PanopticTask(Task):
    name = "panoptic"
    headline = ("PQ", "SQ", "RQ")
    files_help = "PQ as the COCO panoptic API's pq_compute"
    folder = "panoptic"
    prediction_unit = "segments"

    def postprocess(self, mask_logits, class_logits, categories, test_cfg):
        from eomt.evaluation.postprocess import panoptic_inference  # torch: see Task.infer

        return panoptic_inference(
            mask_logits,
            class_logits,
            [bool(c["isthing"]) for c in categories],
            score_threshold=test_cfg.score_threshold,
            overlap_threshold=test_cfg.overlap_threshold,
        )

    def public(self, result, categories):
        """Each segment's `label` (contiguous) and `category_id` (the dataset's)."""
        seg, segments = result
        return seg, [
            {
                "id": segment["id"],
                "label": segment["category_id"],
                "category_id": categories[segment["category_id"]]["id"],
                "isthing": segment["isthing"],
                "score": segment["score"],
            }
            for segment in segments
        ]

    def stitch(self, tiles, results, height, width, categories, test_cfg):
        """Segments of one object or stuff class across tiles joined (`stitch_panoptic`), with
        the keys of an untiled image's."""
        from eomt.deploy.tiling import stitch_panoptic  # torch: see Task.infer

        seg, segments = stitch_panoptic(tiles, list(results), height, width)
        return seg, [{key: s[key] for key in PUBLIC_KEYS} for s in segments]

    def count_predictions(self, result) -> int:
        return len(result[1])

    def ground_truth(self, target, categories):
        is_thing = [bool(c["isthing"]) for c in categories]
        return masks_to_panoptic(target["masks"], target["labels"], target["is_crowd"], is_thing)

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        panoptic_dir = (
            Path(output_dir, "panoptic") if output_dir and test_cfg.save_panoptic else None
        )
        return PanopticEvaluator(categories, workers=test_cfg.pq_workers, output_dir=panoptic_dir)

    def score(self, evaluator, result, truth, target):
        seg, segments = result
        gt_seg, gt_segments = truth
        evaluator.process(
            seg.cpu().numpy(),
            segments,
            gt_seg,
            gt_segments,
            image_id=target["image_id"],
            file_name=target["file_name"],
        )

    def evaluation_picture(self, picture, result, truth, categories):
        seg, segments = result
        return [
            ("ground truth", draw_panoptic(picture, *truth, categories)),
            ("prediction", draw_panoptic(picture, seg.cpu().numpy(), segments, categories)),
        ]

    def open_json(self, output_dir, categories):
        return StreamedJson(
            Path(output_dir, "panoptic.json"),
            "annotations",
            ("images",),
            {"categories": categories},
        )

    def add_file_arguments(self, parser) -> None:
        parser.add_argument("--gt-json", required=True, help="COCO panoptic ground-truth JSON")
        parser.add_argument("--gt-dir", required=True, help="folder of ground-truth PNGs")
        parser.add_argument("--pred-json", required=True, help="COCO panoptic result JSON")
        parser.add_argument("--pred-dir", required=True, help="folder of predicted PNGs")
        parser.add_argument(
            "--workers", type=int, help="worker processes; 0: none (default: min(8, CPU count))"
        )

    def score_files(self, args) -> tuple[dict, str]:
        summary = evaluate_files(
            args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, args.workers
        )
        return summary, format_table(summary)

    def image_outputs(self, picture, result, info, name, categories, overlay, score_threshold):
        seg, segments = result[0].cpu().numpy(), result[1]
        height, width = seg.shape
        entries = {
            "annotations": [_annotation(info["id"], name, seg, segments)],
            "images": [{**info, "height": height, "width": width}],
        }
        pngs = [("panoptic", partial(id_to_rgb, seg))]
        if overlay:  # the drawing code reads a segment's "category_id" as its label
            by_label = [{**segment, "category_id": segment["label"]} for segment in segments]
            pngs.append(("overlay", partial(draw_panoptic, picture, seg, by_label, categories)))
        return pngs, entries


def _annotation(image_id, name, seg, segments) -> dict:
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
                "score": json_score(segment["score"]),
            }
        )
    return {"image_id": image_id, "file_name": f"{name}.png", "segments_info": info}


# -- files -> metrics ----------------------------------------------------------------------------


def _with_contiguous_labels(segments: list[dict], label_of: dict, where: str) -> list[dict]:
    converted = []
    for segment in segments:
        if segment["category_id"] not in label_of:
            raise ValueError(
                f"{where}: segment {segment['id']} has unknown category_id {segment['category_id']}"
            )
        converted.append({**segment, "category_id": label_of[segment["category_id"]]})
    return converted


def evaluate_files(
    gt_json: str, gt_dir: str, pred_json: str, pred_dir: str, workers: int | None = None
) -> dict:
    """PQ, SQ, RQ (percent) and N for All / Things / Stuff, and per class keyed by category id,
    of COCO panoptic files on both sides (segment-id PNGs and a JSON). As in pq_compute, every
    ground-truth image needs a prediction; predictions of other images are ignored."""
    gt = load_panoptic_json(gt_json, ground_truth=True)
    pred = load_panoptic_json(pred_json, ground_truth=False)
    gt_dir, pred_dir = require_dir(gt_dir), require_dir(pred_dir)
    categories = gt["categories"]
    label_of = {category["id"]: label for label, category in enumerate(categories)}
    pred_by_image = {}
    for annotation in pred["annotations"]:
        if annotation["image_id"] in pred_by_image:
            raise ValueError(f"{pred_json}: image id {annotation['image_id']} appears twice")
        pred_by_image[annotation["image_id"]] = annotation
    gt_ids = [annotation["image_id"] for annotation in gt["annotations"]]
    check_image_ids(pred_by_image, gt_ids, pred_json, gt_json)

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
        for group, suffix in GROUPS
    }
    summary["per_class"] = {
        str(entry["id"]): {key: value for key, value in entry.items() if key != "id"}
        for entry in results["per_class"]
    }
    return summary


def format_table(summary: dict) -> str:
    """The All / Things / Stuff table of pq_compute, then one row per class."""
    lines = [f"{'':10s}| {'PQ':>6s} {'SQ':>6s} {'RQ':>6s} {'N':>5s}", "-" * 38]
    for group, _ in GROUPS:
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
