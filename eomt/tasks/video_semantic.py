"""Video semantic segmentation (VSPW): per frame a class map, scored by mIoU and video
consistency (eomt/evaluation/video_semantic.py). Results are (T, H, W) int64 classes
(`eomt.evaluation.video_postprocess.video_semantic_inference`)."""

from __future__ import annotations

from eomt.evaluation.video_semantic import VideoSemanticFiles
from eomt.tasks.video import VideoTask


class VideoSemanticTask(VideoTask):
    name = "vss"
    headline = ("mIoU", "VC16")
    files_help = VideoSemanticFiles.files_help
    prediction_unit = "frames"

    def postprocess_video(self, mask_logits, class_logits, restore, categories, test_cfg):
        from eomt.evaluation.video_postprocess import video_semantic_inference

        return video_semantic_inference(mask_logits, class_logits, restore)

    def count_predictions(self, result) -> int:
        return int(result.shape[0])

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        from eomt.evaluation.video_semantic import VideoSemanticEvaluator

        return VideoSemanticEvaluator(categories)

    def add_file_arguments(self, parser) -> None:
        VideoSemanticFiles().add_file_arguments(parser)

    def score_files(self, args) -> tuple[dict, str]:
        return VideoSemanticFiles().score_files(args)
