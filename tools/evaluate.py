"""Evaluate segmentation predictions saved on disk against ground truth.

    python tools/evaluate.py panoptic --gt-json panoptic_val2017.json --gt-dir panoptic_val2017 \
        --pred-json predictions.json --pred-dir predictions [--json] [--workers N]
    python tools/evaluate.py semantic --gt-dir annotations/validation --pred-dir predictions \
        --num-classes 150 --label-offset 1 [--class-names names.txt] [--output-dir D] [--json]
    python tools/evaluate.py instance --gt-json instances_val2017.json \
        --pred-json segm_results.json [--json]
    python tools/evaluate.py vis --gt-json valid.json --pred-json results.json [--json]
    python tools/evaluate.py vps --gt-json panoptic_gt_VIPSeg_val.json --gt-dir panomasksRGB \
        --pred-json inference/pred.json --pred-dir inference/pan_pred [--json]
    python tools/evaluate.py vss --gt-dir VSPW_480p --pred-dir inference [--split val.txt] [--json]

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
vis: YouTube-VIS ground truth (videos, per-frame polygons or RLE, null where absent) and results
(video_id, category_id, per-frame RLE or null, score): AP / AR with ytvis_api's definitions
(spatio-temporal mask IoU, mean areas over the frames, see eomt/evaluation/video_instance.py).
vps: VIPSeg ground truth (a JSON of videos, per-frame segments_info and categories, and
GT_DIR/VIDEO/FRAME.png) and the predictions VidEoMT's vps_eval writes (pred.json and
pan_pred/VIDEO/FRAME.png, frames in the ground truth's order): VPQ with the definitions of the
VIPSeg eval_vpq script, the PQ of windows of 1, 2, 4, 6, 8 frames taken as one image, averaged
(see eomt/evaluation/video_panoptic.py).
vss: VSPW ground truth (GT_DIR/data/VIDEO/mask/*.png, value v class v - 1) and predicted class
PNGs (PRED_DIR/VIDEO/*.png) of the videos of the split file: mIoU, fwIoU, mACC, pACC and the
video consistency VC8, VC16 with the definitions of the VSPW scripts (VC16 as they print it,
pooled with the 8-frame windows; VC16_alone without them; see
eomt/evaluation/video_semantic.py).

Predictions are matched to the ground truth by image id: tools/predict.py writes its ids with
--coco-json GT_JSON (without, its ids are file stems, which match no ground-truth id).

Every number is a percentage (pq_compute returns fractions and prints percentages). --json
prints a single JSON object instead of the tables (NaN, for a class without ground truth, as
null).
"""

import argparse
import json

from eomt.cli import ToolParser, run_tool
from eomt.evaluation.files import json_ready
from eomt.tasks import TASKS


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    for name, task in TASKS.items():
        subparser = tasks.add_parser(name, help=task.files_help)
        task.add_file_arguments(subparser)
        subparser.add_argument(
            "--json", action="store_true", help="print one JSON object (percentages)"
        )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary, table = TASKS[args.task].score_files(args)
    print(json.dumps(json_ready(summary), allow_nan=False) if args.json else table)
    return summary


if __name__ == "__main__":
    run_tool(main)
