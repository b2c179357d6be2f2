"""Instance segmentation: scored binary masks of thing classes, scored by mask AP (COCOeval).

Results are {masks (M, H, W) bool, scores (M,), labels (M,)}; written as one COCO results JSON
(RLE masks, boxes, scores) and read back from such a file by `evaluate_files`.

pycocotools (and with it urllib and http) is imported where it is used: scoring panoptic or
semantic files does not wait for it.
"""

from __future__ import annotations

import contextlib
import io
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from eomt.deploy.streamed_json import StreamedJson
from eomt.evaluation.files import check_image_ids, load_json
from eomt.pictures import draw_instances
from eomt.tasks.base import Task, json_score

if TYPE_CHECKING:
    from pycocotools.coco import COCO


class InstanceTask(Task):
    name = "instance"
    headline = ("AP",)
    files_help = "mask AP by COCOeval"
    prediction_unit = "instance masks with pixels"

    def postprocess(self, mask_logits, class_logits, categories, test_cfg):
        """Thing classes only when the dataset has stuff (a panoptic model)."""
        from eomt.evaluation.postprocess import instance_inference  # torch: see Task.infer

        things = [i for i, c in enumerate(categories) if c["isthing"]]
        return instance_inference(
            mask_logits,
            class_logits,
            topk=test_cfg.topk,
            thing_classes=None if len(things) == len(categories) else things,
        )

    def public(self, result, categories):
        """Also each instance's dataset category id (`category_ids`)."""
        ids = result["labels"].new_tensor([c["id"] for c in categories])
        return {**result, "category_ids": ids[result["labels"]]}

    def stitch(self, tiles, results, height, width, categories, test_cfg):
        """Instances of one object across tiles joined (`stitch_instances`), the best
        `test.topk` by score; each mask within its box, as a full-size mask per instance would
        not fit a large image: {"boxes" (M, 4) int64 (x0, y0, x1, y1), end exclusive, "masks"
        [M bool (y1 - y0, x1 - x0)], "scores", "labels", "category_ids"}."""
        import torch

        from eomt.deploy.tiling import stitch_instances

        per_tile = ((r["masks"].cpu(), r["scores"].cpu(), r["labels"].cpu()) for r in results)
        instances = stitch_instances(tiles, per_tile, test_cfg.topk)
        boxes = [(x0, y0, x1, y1) for y0, x0, y1, x1 in (i.box for i in instances)]
        result = {
            "boxes": torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4),
            "masks": [instance.mask for instance in instances],
            "scores": torch.tensor([instance.score for instance in instances]),
            "labels": torch.tensor([instance.label for instance in instances], dtype=torch.int64),
        }
        return self.public(result, categories)

    def count_predictions(self, result) -> int:
        if "boxes" in result:
            return sum(int(mask.any()) for mask in result["masks"])
        return int(result["masks"].flatten(1).any(1).sum())

    def ground_truth(self, target, categories):
        return target  # the evaluator encodes the target's masks itself

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        from eomt.evaluation.instance import InstanceEvaluator  # pycocotools

        return InstanceEvaluator(categories)

    def score(self, evaluator, result, truth, target):
        evaluator.process(target["image_id"], truth, {k: v.cpu() for k, v in result.items()})

    def open_json(self, output_dir, categories):
        return StreamedJson(Path(output_dir, "instances.json"))

    def add_file_arguments(self, parser) -> None:
        parser.add_argument("--gt-json", required=True, help="COCO instance ground-truth JSON")
        parser.add_argument("--pred-json", required=True, help="COCO results JSON (RLE masks)")

    def score_files(self, args) -> tuple[dict, str]:
        summary, coco_summary = evaluate_files(args.gt_json, args.pred_json)
        return summary, format_table(summary, coco_summary)

    def image_outputs(self, picture, result, info, name, categories, overlay, score_threshold):
        result = {key: _on_cpu(value) for key, value in result.items()}
        pngs = []
        if overlay:
            drawing = partial(draw_instances, picture, result, categories, score_threshold)
            pngs.append(("overlay", drawing))
        return pngs, {None: _annotations(info["id"], result, picture.shape[:2])}


def _on_cpu(value):
    return [v.cpu() for v in value] if isinstance(value, list) else value.cpu()


def _rles(result, size: tuple[int, int]) -> list[dict]:
    """COCO RLEs of the image's masks, or of a tiled image's masks within their boxes."""
    from pycocotools import mask as mask_utils

    if not len(result["scores"]):
        return []
    if "boxes" not in result:
        masks = result["masks"].numpy().transpose(1, 2, 0).astype(np.uint8)
        return mask_utils.encode(np.asfortranarray(masks))
    rles = []
    for mask, (x0, y0, x1, y1) in zip(result["masks"], result["boxes"].tolist()):
        full = np.zeros(size, dtype=np.uint8, order="F")  # one image-sized mask at a time
        full[y0:y1, x0:x1] = mask.numpy()
        rles.append(mask_utils.encode(full))
    return rles


def _annotations(image_id, result, size: tuple[int, int]) -> list[dict]:
    from pycocotools import mask as mask_utils

    rles = _rles(result, size)
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
                "score": json_score(score),
            }
        )
    return annotations


# -- files -> metrics ----------------------------------------------------------------------------


def _checked_results(predictions, coco_gt: COCO, pred_json: str, gt_json: str) -> list[dict]:
    """The results with every field COCOeval reads checked, "bbox" dropped."""
    if not isinstance(predictions, list):
        raise ValueError(f"{pred_json}: expected a JSON list of results")
    pred_ids = [result.get("image_id") for result in predictions if isinstance(result, dict)]
    check_image_ids(pred_ids, coco_gt.imgs, pred_json, gt_json)
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


def evaluate_files(gt_json: str, pred_json: str) -> tuple[dict, str]:
    """The 12 COCO mask AP / AR numbers and per-class AP (percent), and COCOeval's summary, of
    a COCO results file (image_id, category_id, RLE segmentation, score) against COCO instance
    ground truth. A "bbox" in a result is dropped, so that a detection's area (which sorts it
    into small / medium / large) is its mask's."""
    from pycocotools.coco import COCO

    from eomt.evaluation.instance import COCO_STATS, coco_mask_ap

    dataset = load_json(gt_json)
    if not isinstance(dataset, dict) or not {"images", "annotations", "categories"} <= set(dataset):
        raise ValueError(f"{gt_json}: a COCO instance JSON needs images, annotations, categories")
    coco_gt = COCO()
    coco_gt.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    predictions = _checked_results(load_json(pred_json), coco_gt, pred_json, gt_json)
    results, coco_summary = coco_mask_ap(coco_gt, predictions)
    summary = {key: results[key] for key in COCO_STATS}
    summary["per_class"] = {
        str(entry["id"]): {"name": entry["name"], "AP": entry["AP"]}
        for entry in results["per_class"]
    }
    return summary, coco_summary


def format_table(summary: dict, coco_summary: str) -> str:
    """COCOeval's 12-line summary (fractions, as pycocotools prints it), then AP per class."""
    lines = [coco_summary, "", f"{'id':>5s}  {'name':24s} {'AP':>6s}"]
    for category_id, row in summary["per_class"].items():
        lines.append(f"{category_id:>5s}  {row['name'][:24]:24s} {row['AP']:6.2f}")
    return "\n".join(lines)
