"""What the video tasks (vis, vps, vss) share: an evaluation item is a whole video, frames
(T, 3, H, W) and a target of tracks (`masks` (N, T, H, W), `labels`, `video_id`); the model
(VidEoMT) runs over it frame by frame, carrying its queries, and each task makes the video's
result from the per-frame logits of the whole video (eomt/evaluation/video_postprocess.py)."""

from __future__ import annotations

from eomt.tasks.base import Task


class VideoTask(Task):
    video = True

    def infer(self, model, images, cfg, categories, tasks, every_depth=False):
        """Per video (`images`: whole videos), its per-frame logits (VidEoMT streaming, one
        frame at a time), then each task's result; the final depth only."""
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
        """A video's per-frame mask logits (T, K, h, w), class logits (T, K, C+1) and the map
        of one frame's mask logits to the video's size -> the task's result."""
        raise NotImplementedError

    def postprocess(self, mask_logits, class_logits, categories, test_cfg):
        """A video's per-frame logits (T, K, H, W) at its size and (T, K, C+1)."""
        return self.postprocess_video(mask_logits, class_logits, None, categories, test_cfg)

    def stitch(self, tiles, results, height, width, categories, test_cfg):
        raise NotImplementedError(f"{self.name}: tiled prediction is for images")

    def ground_truth(self, target, categories):
        return target  # the evaluator reads the tracks itself

    def score(self, evaluator, result, truth, target):
        video_id = target.get("video_id", target.get("image_id"))
        if video_id is None:
            raise ValueError(f"{self.name}: an evaluation target needs its video_id")
        evaluator.process(video_id, truth, result)

    def image_outputs(self, picture, result, info, name, categories, overlay, score_threshold):
        raise NotImplementedError(f"{self.name}: tools/predict.py writes images, not videos")
