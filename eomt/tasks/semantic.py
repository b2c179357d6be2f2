"""Semantic segmentation: one class per pixel, scored by mIoU from a confusion matrix.

Results are label maps (H, W) of contiguous class indices; written as label PNGs (16-bit above
255 classes) and read back from folders of such PNGs by `evaluate_files`. A model trained for
this task predicts overlapping square windows (`eomt.inference.predict_semantic_windows`).
"""

from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from eomt.evaluation.files import require_dir
from eomt.evaluation.semantic import SemanticEvaluator, masks_to_semantic
from eomt.pictures import draw_semantic
from eomt.tasks.base import Task

METRICS = ("mIoU", "fwIoU", "mACC", "pACC")


class SemanticTask(Task):
    name = "semantic"
    headline = ("mIoU",)
    files_help = "mIoU from folders of label PNGs"
    folder = "semantic"
    prediction_unit = "distinct labels"

    def infer(self, model, images, cfg, categories, tasks, every_depth=False):
        """A semantic model's geometry: square windows along the long side, semantic only."""
        if [task.name for task in tasks] != [self.name]:
            raise ValueError(
                "a model trained for the semantic task gives semantic results only, not "
                f"{[task.name for task in tasks]}"
            )
        size = cfg.input.image_size
        if size[0] != size[1]:
            raise ValueError(f"semantic inference uses square windows; input.image_size is {size}")
        from eomt.inference import predict_semantic_windows  # torch: see Task.infer

        by_depth = predict_semantic_windows(model, images, size[0], cfg.solver.amp, every_depth)
        return [[{self.name: s.argmax(0)} for s in scores] for scores in by_depth]

    def postprocess(self, mask_logits, class_logits, categories, test_cfg):
        from eomt.evaluation.postprocess import semantic_inference  # torch: see Task.infer

        return semantic_inference(mask_logits, class_logits).argmax(0)

    def stitch(self, tiles, results, height, width, categories, test_cfg):
        """Each pixel's label from the tile whose core holds it."""
        from eomt.deploy.tiling import paste_cores  # torch: see Task.infer

        return paste_cores(tiles, results, height, width)

    def count_predictions(self, result) -> int:
        return int(result.unique().numel())

    def ground_truth(self, target, categories):
        return masks_to_semantic(target["masks"], target["labels"], target["is_crowd"])

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        return SemanticEvaluator(len(categories), [c["name"] for c in categories])

    def score(self, evaluator, result, truth, target):
        evaluator.process(result.cpu().numpy(), truth)

    def save(self, evaluator, output_dir):
        """The per-class table and the confusion matrix, under semantic/."""
        evaluator.save(str(Path(output_dir, "semantic")))

    def add_file_arguments(self, parser) -> None:
        parser.add_argument("--gt-dir", required=True, help="ground-truth label PNGs")
        parser.add_argument("--pred-dir", required=True, help="predicted label PNGs, same names")
        parser.add_argument("--num-classes", type=int, required=True)
        parser.add_argument("--ignore-index", type=int, default=255, help="PNG value to ignore")
        parser.add_argument(
            "--label-offset", type=int, default=0, help="class = PNG value - offset (ADE20K: 1)"
        )
        parser.add_argument("--class-names", help="text file, one class name per line")
        parser.add_argument(
            "--output-dir", help="write per_class.csv and the confusion matrix (.npy, .csv) there"
        )

    def score_files(self, args) -> tuple[dict, str]:
        names = args.class_names and read_class_names(args.class_names, args.num_classes)
        summary = evaluate_files(
            args.gt_dir,
            args.pred_dir,
            args.num_classes,
            args.ignore_index,
            args.label_offset,
            names,
            args.output_dir,
        )
        return summary, format_table(summary)

    def image_outputs(self, picture, result, info, name, categories, overlay, score_threshold):
        labels = result.cpu().numpy()
        dtype = np.uint8 if len(categories) <= 255 else np.uint16
        pngs = [("semantic", partial(labels.astype, dtype))]
        if overlay:
            pngs.append(("overlay", partial(draw_semantic, picture, labels, categories)))
        return pngs, {}


# -- files -> metrics ----------------------------------------------------------------------------


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


def evaluate_files(
    gt_dir: str,
    pred_dir: str,
    num_classes: int,
    ignore_index: int = 255,
    label_offset: int = 0,
    class_names: list[str] | None = None,
    output_dir: str | None = None,
) -> dict:
    """mIoU, fwIoU, mACC, pACC and per-class IoU / ACC (percent) over gt_dir's label PNGs,
    matched by file name in pred_dir, the same encoding on both sides: value v is class
    v - label_offset; the ignore value and values outside the classes are ignored in the
    ground truth (and refused in a prediction where the ground truth is not ignored)."""
    gt_dir, pred_dir = require_dir(gt_dir), require_dir(pred_dir)
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
    summary = {key: results[key] for key in METRICS}
    summary["per_class"] = [
        {"name": name, "IoU": iou, "ACC": accuracy}
        for name, iou, accuracy in zip(names, results["per_class_iou"], results["per_class_acc"])
    ]
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'class':24s} {'IoU':>7s} {'ACC':>7s}"]
    for row in summary["per_class"]:
        lines.append(f"{row['name'][:24]:24s} {row['IoU']:7.2f} {row['ACC']:7.2f}")
    lines += ["", "  ".join(f"{key} {summary[key]:.2f}" for key in METRICS)]
    return "\n".join(lines)
