"""Video panoptic segmentation (VIPSeg): per frame a segment id map whose ids are the same
object (or stuff class) over the whole video, scored by VPQ (eomt/evaluation/video_panoptic.py).

Results are {segments (T, H, W) int32, segments_info [{id, label, isthing, score, query}]}
(`eomt.evaluation.video_postprocess.video_panoptic_inference`, test.score_threshold and
test.overlap_threshold as the authors' OBJECT_MASK_THRESHOLD and OVERLAP_THRESHOLD).
"""

from __future__ import annotations

from eomt.evaluation.video_panoptic import VideoPanopticFiles
from eomt.tasks.video import VideoTask


class VideoPanopticTask(VideoTask):
    name = "vps"
    headline = ("VPQ",)
    files_help = VideoPanopticFiles.files_help
    prediction_unit = "video segments"

    def postprocess_video(self, mask_logits, class_logits, restore, categories, test_cfg):
        from eomt.evaluation.video_postprocess import video_panoptic_inference

        return video_panoptic_inference(
            mask_logits,
            class_logits,
            [bool(c["isthing"]) for c in categories],
            test_cfg.score_threshold,
            test_cfg.overlap_threshold,
            restore,
        )

    def count_predictions(self, result) -> int:
        return len(result["segments_info"])

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        from eomt.evaluation.video_panoptic import VideoPanopticEvaluator

        return VideoPanopticEvaluator(categories)

    def add_file_arguments(self, parser) -> None:
        VideoPanopticFiles().add_file_arguments(parser)

    def score_files(self, args) -> tuple[dict, str]:
        return VideoPanopticFiles().score_files(args)
