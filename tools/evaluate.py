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
import json
import sys

from eomt.evaluation.files import json_ready
from eomt.tasks import instance, panoptic, semantic


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
        summary = panoptic.evaluate_files(
            args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, args.workers
        )
        table = panoptic.format_table(summary)
    elif args.task == "semantic":
        names = args.class_names and semantic.read_class_names(args.class_names, args.num_classes)
        summary = semantic.evaluate_files(
            args.gt_dir,
            args.pred_dir,
            args.num_classes,
            args.ignore_index,
            args.label_offset,
            names,
            args.output_dir,
        )
        table = semantic.format_table(summary)
    else:
        summary, coco_summary = instance.evaluate_files(args.gt_json, args.pred_json)
        table = instance.format_table(summary, coco_summary)
    print(json.dumps(json_ready(summary), allow_nan=False) if args.json else table)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
