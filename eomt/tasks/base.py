"""What a task is: everything between the model's logits and the task's results, metrics and
files. `eomt/tasks/{panoptic,semantic,instance}.py` each define one; the evaluation loop and
the predictor call these methods and know no task by name."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only in annotations: importing this module stays cheap
    import torch


class Task(ABC):
    name: str
    headline: tuple[str, ...]  # the metric keys of the one-line summary, in order
    folder: str | None = None  # where written predictions keep one PNG per image
    prediction_unit: str  # what `count_predictions` counts
    video = False  # an item is a whole video (T, 3, H, W), its result the video's

    # -- logits -> results -------------------------------------------------------------------

    def infer(
        self, model, images: list[torch.Tensor], cfg, categories, tasks, every_depth=False
    ) -> list[list[dict]]:
        """Per depth (the final only, or with `every_depth` every prediction the model returns,
        the final last), per image: {task name: result} for each of `tasks`. The input geometry
        is that of a model trained for this task: long side resized and padded, logits
        restored to each image's size, then each task's post-processing."""
        from eomt.inference import predict_logits  # torch: not needed to score files

        size, amp = cfg.input.image_size, cfg.solver.amp
        return [
            [
                {
                    task.name: task.postprocess(masks, classes, categories, cfg.test)
                    for task in tasks
                }
                for masks, classes in logits
            ]
            for logits in predict_logits(model, images, size, amp, every_depth)
        ]

    @abstractmethod
    def postprocess(self, mask_logits, class_logits, categories: list[dict], test_cfg):
        """One image's final logits (K, H, W) and (K, C+1) -> the task's result, with
        contiguous labels (indices into `categories`), as the evaluators take them."""

    def public(self, result, categories: list[dict]):
        """The result as the predictor gives it: also naming classes by dataset category id."""
        return result

    @abstractmethod
    def stitch(self, tiles, results, height: int, width: int, categories, test_cfg):
        """A large image's result from the public results of its tiles (`results`, in the
        order of `tiles`, see `eomt.deploy.tiling`; any iterable, consumed one tile at a time)."""

    @abstractmethod
    def count_predictions(self, result) -> int:
        """How many of `prediction_unit` one image's result holds."""

    # -- results -> metrics ------------------------------------------------------------------

    @abstractmethod
    def ground_truth(self, target: dict, categories: list[dict]):
        """A dataset target (masks, labels, is_crowd) -> what the evaluator compares with."""

    @abstractmethod
    def build_evaluator(self, categories: list[dict], test_cfg, output_dir=None):
        """The evaluator of the task's metric (`output_dir`: where it may write files)."""

    @abstractmethod
    def score(self, evaluator, result, truth, target: dict) -> None:
        """Add one image's result and ground truth to the evaluator."""

    def save(self, evaluator, output_dir) -> None:
        """Write files beside results.json (after `evaluator.evaluate()`); none by default."""
        return

    def evaluation_picture(self, picture: np.ndarray, result, truth, categories: list[dict]):
        """The ground truth and prediction panels of an evaluation picture, or None."""
        return None

    # -- files -> metrics (tools/evaluate.py TASK) ------------------------------------------

    files_help: str  # one line: what `tools/evaluate.py TASK` scores

    @abstractmethod
    def add_file_arguments(self, parser) -> None:
        """The arguments of `tools/evaluate.py TASK`: where the ground truth and the
        predictions are, and the options of scoring them."""

    @abstractmethod
    def score_files(self, args) -> tuple[dict, str]:
        """(summary, table) of the files those arguments name: the task's metrics (percent)
        and their table as printed."""

    # -- results -> files --------------------------------------------------------------------

    def open_json(self, output_dir, categories: list[dict]):
        """The JSON file written predictions stream into (a `StreamedJson`), or None."""
        return None

    @abstractmethod
    def image_outputs(
        self, picture, result, info: dict, name: str, categories, overlay, score_threshold
    ) -> tuple[list, dict]:
        """One image's written outputs from its public result: PNGs as (folder, function
        giving the pixels) pairs, drawn only when written, and its JSON entries ({list key:
        items}, see `StreamedJson.add`). `info` is the image's {"id", "file_name"}."""


def json_score(value: float) -> float:
    """9 significant digits: every float32 score keeps its own value, so the ranking of the
    JSON file is the model's (ties included) and its AP that of an evaluation in memory."""
    return float(f"{value:.9g}")
