"""The evaluation loop: a model's results on a loader's images, scored by each task of
`test.metrics`, with evaluation pictures and the tasks' files. It knows no task by name."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from eomt import distributed
from eomt.inference import to_uint8
from eomt.pictures import side_by_side, upscale_factor
from eomt.tasks import TASKS, get_task, infer


def build_evaluators(metrics, categories: list[dict], test_cfg, output_dir=None) -> dict:
    """{task name: evaluator} for the tasks named in `metrics` (test.metrics)."""
    for metric in metrics:
        if metric not in TASKS:
            raise ValueError(
                f"test.metrics: unknown metric '{metric}', expected any of {tuple(TASKS)}"
            )
    return {name: TASKS[name].build_evaluator(categories, test_cfg, output_dir) for name in metrics}


@torch.no_grad()
def evaluate(
    model,
    loader,
    cfg,
    categories: list[dict],
    output_dir: str | None,
    show=True,
    evaluators: dict | None = None,
    on_image=None,
):
    """Metrics of `model` on the images of `loader` (each rank its own share).

    Writes evaluation pictures of the first `cfg.test.num_vis` images of each rank (for the
    tasks that draw them) and, with an output directory, each task's files. `evaluators`:
    those to fill (default: `build_evaluators` of test.metrics); `on_image(results, target)`
    sees each image's results. Both are hooks for benchmarks (tools/benchmark_memory.py).
    """
    was_training = model.training
    model.eval()
    if evaluators is None:
        evaluators = build_evaluators(cfg.test.metrics, categories, cfg.test, output_dir)
    # With masked attention at evaluation, each query block's masks come from a prediction of
    # their own: scored too, as the authors log one metric per supervised block.
    every_depth = cfg.test.block_metrics and getattr(model, "masked_attn_active", False)
    block_evaluators = [  # per query block, {task: evaluator}; built on every rank alike
        build_evaluators(list(evaluators), categories, cfg.test)
        for _ in range(model.num_query_blocks if every_depth else 0)
    ]
    vis_dir = Path(output_dir, "vis") if output_dir and cfg.test.num_vis > 0 else None
    num_drawn = 0
    for images, targets in tqdm(loader, desc="eval", disable=not show, leave=False):
        *blocks, final = infer(model, images, cfg, categories, list(evaluators), every_depth)
        for i, (image, target, results) in enumerate(zip(images, targets, final)):
            if on_image is not None:
                on_image(results, target)
            picture = None  # the image as uint8, once, if a task draws it
            for name, result in results.items():
                task = get_task(name)
                truth = task.ground_truth(target, categories)
                task.score(evaluators[name], result, truth, target)
                for block, block_results in zip(block_evaluators, blocks, strict=True):
                    task.score(block[name], block_results[i][name], truth, target)
                if vis_dir is not None and num_drawn < cfg.test.num_vis and not task.video:
                    picture = to_uint8(image) if picture is None else picture
                    panels = task.evaluation_picture(picture, result, truth, categories)
                    if panels is not None:
                        _save_picture(vis_dir, picture, target, panels)
                        num_drawn += 1
    metrics = {name: evaluator.evaluate() for name, evaluator in evaluators.items()}
    for index, block in enumerate(block_evaluators):
        metrics |= {
            f"{name}_block{index}": evaluator.evaluate() for name, evaluator in block.items()
        }
    skipped = [
        m for share in distributed.gather_objects(getattr(loader, "skipped", [])) for m in share
    ]
    if skipped:  # under dataset.bad_samples=skip: the metrics leave these images out
        metrics["skipped_images"] = {"count": len(skipped), "problems": skipped}
    if output_dir and distributed.is_main():
        for name, evaluator in evaluators.items():
            get_task(name).save(evaluator, output_dir)
    model.train(was_training)
    return metrics


def _save_picture(vis_dir: Path, picture, target, panels: list[tuple[str, np.ndarray]]) -> None:
    """The picture beside the task's panels (drawn at the panels' scale), as <file stem>.png."""
    vis_dir.mkdir(parents=True, exist_ok=True)
    scale = upscale_factor(*picture.shape[:2])  # the drawings enlarge small images too
    titles, drawings = zip(*panels)
    panel = side_by_side(
        [picture.repeat(scale, axis=0).repeat(scale, axis=1), *drawings], ["image", *titles]
    )
    Image.fromarray(panel).save(vis_dir / (Path(str(target["file_name"])).stem + ".png"))
