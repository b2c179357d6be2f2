"""Reading prediction and ground-truth files for evaluation: checked paths, JSON and ids."""

import json
import math
from pathlib import Path


def load_json(path: str | Path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"JSON file not found: {path}")
    with open(path) as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error


def require_dir(path: str | Path) -> Path:
    if not Path(path).is_dir():
        raise FileNotFoundError(f"folder not found: {path}")
    return Path(path)


def check_image_ids(pred_ids, gt_ids, pred_json: str, gt_json: str) -> None:
    """Predictions named by file stem (tools/predict.py without --coco-json) match no ground-truth
    image id: say so, rather than a missing prediction or a score of 0."""
    pred_ids = set(pred_ids)
    if any(isinstance(i, str) for i in pred_ids) and pred_ids.isdisjoint(gt_ids):
        example = sorted(map(str, pred_ids))[0]
        raise ValueError(
            f"{pred_json}: its image ids (e.g. {example!r}) match none of {gt_json}: the "
            "predictions are named by file stem; run tools/predict.py with "
            f"--coco-json {gt_json} to give them the ground truth's image ids"
        )


def json_ready(value):
    """NaN -> None, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_ready(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
