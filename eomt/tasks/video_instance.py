"""Video instance segmentation (YouTube-VIS, OVIS): a video's instances, each one query of
VidEoMT followed over all its frames, scored by YouTube-VIS AP / AR.

A dataset with stuff classes (a video panoptic one) is scored on its things only, as the
instance task does on images.

Results are {masks (M, T, H, W) bool, scores (M,), labels (M,), queries (M,)}
(`eomt.evaluation.video_postprocess.video_instance_inference`), written as one YouTube-VIS
results file (vis_results.json) that `tools/evaluate.py vis` scores against the dataset's JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from eomt.evaluation.video_instance import VideoInstanceFiles
from eomt.tasks.video import VideoTask

RESULTS_FILE = "vis_results.json"


class VideoInstanceTask(VideoTask):
    name = "vis"
    headline = ("AP", "AR10")
    files_help = VideoInstanceFiles.files_help
    prediction_unit = "video instances with pixels"

    def postprocess_video(self, mask_logits, class_logits, restore, categories, test_cfg):
        from eomt.evaluation.video_postprocess import video_instance_inference

        things = [i for i, c in enumerate(categories) if c["isthing"]]
        return video_instance_inference(
            mask_logits,
            class_logits,
            test_cfg.topk,
            restore,
            thing_classes=None if len(things) == len(categories) else things,
        )

    def public(self, result, categories):
        ids = result["labels"].new_tensor([c["id"] for c in categories])
        return {**result, "category_ids": ids[result["labels"]]}

    def count_predictions(self, result) -> int:
        return int(result["masks"].flatten(1).any(1).sum())

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        from eomt.evaluation.video_instance import VideoInstanceEvaluator  # pycocotools

        return VideoInstanceEvaluator(categories)

    def score(self, evaluator, result, truth, target):
        super().score(evaluator, {k: v.cpu() for k, v in result.items()}, truth, target)

    def save(self, evaluator, output_dir) -> None:
        """vis_results.json: the predictions as a YouTube-VIS results file."""
        Path(output_dir, RESULTS_FILE).write_text(json.dumps(evaluator.results()))

    def add_file_arguments(self, parser) -> None:
        VideoInstanceFiles().add_file_arguments(parser)

    def score_files(self, args) -> tuple[dict, str]:
        return VideoInstanceFiles().score_files(args)
