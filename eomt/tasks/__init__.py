"""The tasks (panoptic, semantic, instance; vis, vps, vss on videos): one module each, one
registry.

A task (`eomt.tasks.base.Task`) owns the way from final logits to its result, how a dataset
target becomes its ground truth, its evaluator, its result files and its headline metrics.
"""

from eomt.tasks.base import Task
from eomt.tasks.instance import InstanceTask
from eomt.tasks.panoptic import PanopticTask
from eomt.tasks.semantic import SemanticTask
from eomt.tasks.video_instance import VideoInstanceTask
from eomt.tasks.video_panoptic import VideoPanopticTask
from eomt.tasks.video_semantic import VideoSemanticTask

TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        PanopticTask(),
        SemanticTask(),
        InstanceTask(),
        VideoInstanceTask(),
        VideoPanopticTask(),
        VideoSemanticTask(),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}', expected one of {tuple(TASKS)}")
    return TASKS[name]


def infer(model, images: list, cfg, categories, tasks, every_depth=False) -> list[list[dict]]:
    """Per depth (see `Task.infer`: the final only unless `every_depth`), per image: {task:
    result} for each task named in `tasks`, with the input geometry of the model's task."""
    wanted = [get_task(name) for name in tasks]
    return get_task(cfg.task).infer(model, images, cfg, categories, wanted, every_depth)


def summary_line(metrics: dict) -> str:
    """E.g. 'PQ 41.2  SQ 78.0  RQ 50.3  mIoU 70.1  AP 30.5'."""
    parts = [
        f"{key} {metrics[name][key]:.1f}"
        for name, task in TASKS.items()
        if name in metrics
        for key in task.headline
    ]
    if "skipped_images" in metrics:
        parts.append(f"(bad images left out: {metrics['skipped_images']['count']})")
    return "  ".join(parts)


__all__ = ["TASKS", "Task", "get_task", "infer", "summary_line"]
