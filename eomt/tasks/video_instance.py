"""Video instance segmentation (YouTube-VIS, OVIS): a video's instances, each one query of
VidEoMT followed over all its frames, scored by YouTube-VIS AP / AR.

An evaluation item is a whole video: frames (T, 3, H, W) and a target of tracks, `masks`
(N, T, H, W), `labels` (N,), `video_id`. Results are {masks (M, T, H, W) bool, scores (M,),
labels (M,), queries (M,)} (`eomt.evaluation.video_postprocess`), written as one YouTube-VIS
results file (vis_results.json) that `tools/evaluate.py vis` scores against the dataset's JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

from eomt.evaluation.video_instance import VideoInstanceFiles
from eomt.tasks.base import Task

RESULTS_FILE = "vis_results.json"


class VideoInstanceTask(Task):
    name = "vis"
    headline = ("AP", "AR10")
    files_help = VideoInstanceFiles.files_help
    prediction_unit = "video instances with pixels"
    video = True

    def infer(self, model, images, cfg, categories, tasks, every_depth=False):
        """Per video (`images`: whole videos), its per-frame logits (VidEoMT streaming, one
        frame at a time), then each video task's result; the final depth only."""
        from eomt.inference import predict_video_logits  # torch: see Task.infer

        results = []
        for video in images:
            mask_logits, class_logits, restore = predict_video_logits(
                model, video, cfg.input.image_size, cfg.solver.amp
            )
            results.append(
                {
                    task.name: task.postprocess_video(
                        mask_logits, class_logits, restore, categories, cfg.test
                    )
                    for task in tasks
                }
            )
        return [results]

    def postprocess_video(self, mask_logits, class_logits, restore, categories, test_cfg):
        from eomt.evaluation.video_postprocess import video_instance_inference

        return video_instance_inference(mask_logits, class_logits, test_cfg.topk, restore)

    def postprocess(self, mask_logits, class_logits, categories, test_cfg):
        """A video's per-frame logits (T, K, H, W) at its size and (T, K, C+1)."""
        return self.postprocess_video(mask_logits, class_logits, None, categories, test_cfg)

    def public(self, result, categories):
        ids = result["labels"].new_tensor([c["id"] for c in categories])
        return {**result, "category_ids": ids[result["labels"]]}

    def stitch(self, tiles, results, height, width, categories, test_cfg):
        raise NotImplementedError("vis: tiled prediction is for images")

    def count_predictions(self, result) -> int:
        return int(result["masks"].flatten(1).any(1).sum())

    def ground_truth(self, target, categories):
        return target  # the evaluator encodes the tracks itself

    def build_evaluator(self, categories, test_cfg, output_dir=None):
        from eomt.evaluation.video_instance import VideoInstanceEvaluator  # pycocotools

        return VideoInstanceEvaluator(categories)

    def score(self, evaluator, result, truth, target):
        video_id = target.get("video_id", target.get("image_id"))
        if video_id is None:
            raise ValueError("vis: an evaluation target needs its video_id")
        evaluator.process(video_id, truth, {k: v.cpu() for k, v in result.items()})

    def save(self, evaluator, output_dir) -> None:
        """vis_results.json: the predictions as a YouTube-VIS results file."""
        path = Path(output_dir, RESULTS_FILE)
        path.write_text(json.dumps(evaluator.results()))

    def add_file_arguments(self, parser) -> None:
        VideoInstanceFiles().add_file_arguments(parser)

    def score_files(self, args) -> tuple[dict, str]:
        return VideoInstanceFiles().score_files(args)

    def image_outputs(self, picture, result, info, name, categories, overlay, score_threshold):
        raise NotImplementedError("vis: tools/predict.py writes images, not videos")
