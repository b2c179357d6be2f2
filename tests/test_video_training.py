"""Training VidEoMT on clips: the clip loss and its matching, gradients through the query
updater, a tiny overfit that keeps identities, the YouTube-VIS post-processing and evaluator,
and the trainer end to end on synthetic videos."""

import json

import pytest
import torch

from eomt.evaluation.video_instance import VideoInstanceEvaluator
from eomt.evaluation.video_panoptic import VideoPanopticEvaluator
from eomt.evaluation.video_postprocess import (
    video_instance_inference,
    video_panoptic_inference,
    video_semantic_inference,
)
from eomt.evaluation.video_semantic import VideoSemanticEvaluator
from eomt.modeling import VidEoMT, build_vit
from eomt.modeling.criterion import HungarianMatcher, MaskClassificationLoss, count_masks

BIG = 20.0  # a logit that is certain


def box_masks(frames: int, size: int, boxes_per_frame) -> torch.Tensor:
    """(T, size, size) bool masks with one box (y0, x0, y1, x1) per frame, None: empty."""
    masks = torch.zeros(frames, size, size, dtype=torch.bool)
    for t, box in enumerate(boxes_per_frame):
        if box is not None:
            y0, x0, y1, x1 = box
            masks[t, y0:y1, x0:x1] = True
    return masks


def logits_of(masks: torch.Tensor, certainty: float = BIG) -> torch.Tensor:
    return torch.where(masks, certainty, -certainty)


# Track A on the left, track B on the right, both over 4 frames of 16 x 16.
A = box_masks(4, 16, [(0, 0, 8, 6)] * 4)
B = box_masks(4, 16, [(8, 10, 16, 16)] * 4)


def class_logits_for(labels: list[int | None], frames: int = 4, classes: int = 2):
    """(T, K, C+1): each query certain of its label (None: no object)."""
    logits = torch.full((frames, len(labels), classes + 1), -BIG)
    for k, label in enumerate(labels):
        logits[:, k, classes if label is None else label] = BIG
    return logits


def test_perfect_clip_prediction_has_no_loss():
    """Track 0 fills frames 0-1 and is absent after, track 1 fills frames 2-3 (whole frames:
    point sampling of a mask's edge blends pixels, which no prediction can match)."""
    full = torch.ones(16, 16, dtype=torch.bool)
    empty = torch.zeros(16, 16, dtype=torch.bool)
    first = torch.stack([full, full, empty, empty])
    second = torch.stack([empty, empty, full, full])
    target = {"masks": torch.stack([first, second]), "labels": torch.tensor([0, 1])}
    # Query 1 is track 0, query 2 track 1, queries 0 and 3 predict nothing.
    nothing = torch.zeros_like(first)
    mask_logits = logits_of(torch.stack([nothing, first, second, nothing], 1))[None]
    class_logits = class_logits_for([None, 0, 1, None])[None]  # (1, T, K, C+1)
    prediction = {"mask_logits": mask_logits, "class_logits": class_logits}
    for matching in ("first_frame", "clip"):
        loss = MaskClassificationLoss(2, num_points=256, video_matching=matching)
        losses = loss([prediction, prediction], [target])
        for key, value in losses.items():
            assert 0 <= value < 1e-4, key
        # Swapping the two queries' masks is not perfect: the matching follows the classes
        # and the masks of every frame.
        swapped = {**prediction, "mask_logits": mask_logits[:, :, [0, 2, 1, 3]]}
        assert loss([swapped], [target])["loss"] > 1.0
    # Each track is one mask per frame: the normaliser is 2 tracks x 4 frames.
    assert count_masks(target) == 8


def test_clip_cost_follows_the_track():
    """Over the clip, a query that is track A in frames 0-1 and track B in frames 2-3 costs
    more for A than one that is A throughout, though both are A in frames 0 and 1."""
    switching = torch.cat([A[:2], B[2:]])
    mask_logits = logits_of(torch.stack([switching, A], 1))  # (T, K=2, H, W)
    class_logits = class_logits_for([0, 0])
    matcher = HungarianMatcher(num_points=512)
    points = torch.rand(512, 2, generator=torch.Generator().manual_seed(0))
    cost = matcher.clip_cost_matrix(mask_logits, class_logits, A[None], torch.tensor([0]), points)
    assert cost[0, 0] > cost[1, 0] + 2.0  # half the clip's masks are wrong
    # ... and the clip matcher picks the follower for A.
    indices = matcher.match_clips(
        mask_logits[None],
        class_logits[None],
        [{"masks": A[None], "labels": torch.tensor([0])}],
        "clip",
    )
    assert indices[0][0].tolist() == [1]


def test_first_frame_matching_is_the_authors_online_rule():
    """Each track is matched on the frame where it first appears, to a query no earlier track
    took: A (from frame 0) takes query 0, the best on frame 0, though query 1 follows A better
    over the clip; C (from frame 2) cannot take query 0 again and gets query 2."""
    c = box_masks(4, 16, [None, None, (0, 8, 6, 14), (0, 8, 6, 14)])
    switching = torch.cat([A[:2], c[2:]])
    mask_logits = torch.stack(
        [
            logits_of(switching),  # query 0: A, then C
            logits_of(A, certainty=1.0),  # query 1: A throughout, unsure
            logits_of(c, certainty=1.0),  # query 2: C where it is, unsure
        ],
        1,
    )[None]
    class_logits = class_logits_for([0, 0, 1])[None]
    target = {"masks": torch.stack([A, c]), "labels": torch.tensor([0, 1])}
    matcher = HungarianMatcher(num_points=512)
    first = matcher.match_clips(mask_logits, class_logits, [target], "first_frame")[0]
    assert dict(zip(first[1].tolist(), first[0].tolist())) == {0: 0, 1: 2}
    clip = matcher.match_clips(mask_logits, class_logits, [target], "clip")[0]
    assert dict(zip(clip[1].tolist(), clip[0].tolist()))[0] == 1


def test_absent_tracks_are_left_out_and_shapes_checked():
    loss = MaskClassificationLoss(2, num_points=64)
    masks = torch.stack([A, torch.zeros_like(A)])  # the second track has no pixel in the clip
    target = {"masks": masks, "labels": torch.tensor([0, 1])}
    assert count_masks(target) == 4
    prediction = {
        "mask_logits": torch.zeros(1, 4, 3, 16, 16),
        "class_logits": torch.zeros(1, 4, 3, 3),
    }
    assert torch.isfinite(loss([prediction], [target])["loss"])
    with pytest.raises(ValueError, match="T=4"):
        loss([prediction], [{"masks": A[:3][None], "labels": torch.tensor([0])}])


def tiny_videomt(seed=0, size=32):
    torch.manual_seed(seed)
    vit = build_vit(
        "vit_small_patch14_reg4_dinov2",
        img_size=(size, size),
        patch_size=8,
        embed_dim=32,
        depth=3,
        num_heads=2,
    )
    return VidEoMT(vit, 2, 4, num_query_blocks=2)


def moving_clip(frames=4, size=32, shift=0):
    """A bright square (class 0) moving right and a dark bar (class 1) moving down, on grey;
    on the 4-pixel grid of the model's 1/4 masks."""
    video = torch.full((frames, 3, size, size), 0.5)
    square = torch.zeros(frames, size, size, dtype=torch.bool)
    bar = torch.zeros(frames, size, size, dtype=torch.bool)
    for t in range(frames):
        x = 4 * t + shift
        square[t, 0:12, x : x + 12] = True
        y = 12 + 4 * t
        bar[t, y : y + 8, shift : shift + 24] = True
    for t in range(frames):
        video[t, :, square[t]] = torch.tensor([1.0, 0.9, 0.2])[:, None]
        video[t, :, bar[t]] = torch.tensor([0.1, 0.1, 0.6])[:, None]
    target = {"masks": torch.stack([square, bar]), "labels": torch.tensor([0, 1])}
    return video, target


def test_gradients_flow_through_the_query_updater():
    model = tiny_videomt().train()
    video, target = moving_clip()
    loss = MaskClassificationLoss(2, num_points=64)
    losses = loss(model(video[None]), [target])
    losses["loss"].backward()
    assert model.query_updater.weight.grad.abs().sum() > 0
    assert model.query_updater.bias.grad.abs().sum() > 0
    assert model.queries.weight.grad.abs().sum() > 0


def test_tiny_overfit_keeps_identities():
    """A few clips learnt by heart: each object is one query in every frame (the query of the
    best IoU), and the video's instances (the VIS post-processing) are the two tracks (AP 100:
    a switch of identity would halve a track's spatio-temporal IoU)."""
    model = tiny_videomt(seed=1)
    clips = [moving_clip(shift=s) for s in (0, 4, 8)]
    videos = torch.stack([video for video, _ in clips])
    targets = [target for _, target in clips]
    loss = MaskClassificationLoss(2, num_points=256)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(80):
        optimizer.zero_grad()
        loss(model(videos), targets)["loss"].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        frames = model(videos)
    mask_logits = torch.stack([f["mask_logits"] for f in frames], 1)  # (B, T, K, 8, 8)
    class_logits = torch.stack([f["class_logits"] for f in frames], 1)
    evaluator = VideoInstanceEvaluator(
        [{"id": 1, "name": "square", "isthing": 1}, {"id": 2, "name": "bar", "isthing": 1}]
    )
    for index, target in enumerate(targets):
        small = torch.nn.functional.interpolate(target["masks"].float(), (8, 8)) > 0.5
        predicted = mask_logits[index] > 0  # (T, K, 8, 8)
        for track in small:  # (T, 8, 8)
            inter = (predicted & track[:, None]).flatten(2).sum(2)
            union = (predicted | track[:, None]).flatten(2).sum(2)
            best = (inter / union.clamp(min=1)).argmax(1)  # per frame
            assert len(set(best.tolist())) == 1, best
        result = video_instance_inference(mask_logits[index], class_logits[index], topk=2)
        evaluator.process(index, {"masks": small, "labels": target["labels"]}, result)
    assert evaluator.evaluate()["AP"] == pytest.approx(100.0)


def test_vis_postprocessing_by_hand():
    # 2 frames, 3 queries, 2 classes (+ no object).
    class_logits = torch.tensor(
        [
            [[2.0, 0.0, 0.0], [0.0, 0.0, 4.0], [0.0, 1.0, 0.0]],
            [[0.0, 0.0, 0.0], [0.0, 0.0, 4.0], [0.0, 3.0, 0.0]],
        ]
    )
    mask_logits = torch.zeros(2, 3, 2, 2)
    mask_logits[0, 2, 0, 0] = 1.0  # query 2: pixel (0, 0) in frame 0, (1, 1) in frame 1
    mask_logits[1, 2, 1, 1] = 1.0
    result = video_instance_inference(mask_logits, class_logits, topk=2)
    # Logits averaged over frames, then soft-maxed: query 2's mean is (0, 2, 0).
    scores = class_logits.mean(0).softmax(-1)[:, :2]
    assert torch.allclose(result["scores"], scores.flatten().topk(2).values)
    assert result["queries"].tolist() == [2, 0] and result["labels"].tolist() == [1, 0]
    assert result["scores"][0] == pytest.approx(torch.tensor([0.0, 2.0, 0.0]).softmax(0)[1])
    assert result["masks"].shape == (2, 2, 2, 2)
    assert result["masks"][0, 0].tolist() == [[True, False], [False, False]]
    assert result["masks"][0, 1].tolist() == [[False, False], [False, True]]
    # restore: each frame's chosen logits resized to the video's size.
    upsized = video_instance_inference(
        mask_logits,
        class_logits,
        topk=1,
        restore=lambda m: m.repeat_interleave(2, -1).repeat_interleave(2, -2),
    )
    assert upsized["masks"].shape == (1, 2, 4, 4) and upsized["masks"][0, 0, :2, :2].all()
    # A panoptic dataset's instances are of its thing classes only.
    things = video_instance_inference(mask_logits, class_logits, topk=2, thing_classes=[0])
    assert things["labels"].tolist() == [0, 0] and things["queries"].tolist() == [0, 2]


def test_vis_evaluator_penalises_an_identity_switch():
    categories = [{"id": 7, "name": "thing", "isthing": 1}]
    gt = {"masks": torch.stack([A, B]), "labels": torch.tensor([0, 0])}

    def ap(tracks):
        evaluator = VideoInstanceEvaluator(categories)
        evaluator.process(
            3,
            gt,
            {"masks": tracks, "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([0, 0])},
        )
        return evaluator.evaluate()["AP"], evaluator.results()

    perfect, results = ap(torch.stack([A, B]))
    switched, _ = ap(torch.stack([torch.cat([A[:2], B[2:]]), torch.cat([B[:2], A[2:]])]))
    assert perfect == pytest.approx(100.0) and switched < 50.0
    assert [r["category_id"] for r in results] == [7, 7] and len(results[0]["segmentations"]) == 4


def halves(frames=2, size=4):
    """Per frame a left half, a top-right and a bottom-right quarter: (3, T, size, size)."""
    masks = torch.zeros(3, frames, size, size, dtype=torch.bool)
    masks[0, :, :, : size // 2] = True
    masks[1, :, : size // 2, size // 2 :] = True
    masks[2, :, size // 2 :, size // 2 :] = True
    return masks


def test_vps_postprocessing_by_hand():
    """Query 0 a thing on the left, queries 1 and 2 the same stuff class on the two right
    quarters (one segment id), query 3 unsure of its class (dropped)."""
    regions = halves()
    mask_logits = logits_of(torch.cat([regions, regions[:1]]).transpose(0, 1))  # (T, 4, 4, 4)
    class_logits = class_logits_for([0, 1, 1, None], frames=2)
    class_logits[:, 3] = 0.0  # a third each: below the 0.8 threshold
    result = video_panoptic_inference(mask_logits, class_logits, [True, False])
    segments, info = result["segments"], result["segments_info"]
    assert segments.shape == (2, 4, 4) and segments.dtype == torch.int32
    assert [(s["id"], s["label"], s["isthing"], s["query"]) for s in info] == [
        (1, 0, True, 0),
        (2, 1, False, 1),
    ]
    assert segments[:, :, :2].eq(1).all() and segments[:, :, 2:].eq(2).all()
    # A query mostly hidden by a more confident one is dropped (overlap threshold).
    covered = mask_logits.clone()
    covered[:, 1] = logits_of(regions[1] | regions[2]).transpose(0, 1)[:, 0]  # right half
    class_logits[:, 1] = torch.tensor([-BIG, 2.0, 0.0])  # p 0.88: query 2 takes the bottom
    dropped = video_panoptic_inference(covered, class_logits, [True, False])
    assert [s["query"] for s in dropped["segments_info"]] == [0, 2]


def test_vps_evaluator_scores_a_perfect_video_and_penalises_a_switch():
    categories = [{"id": 5, "name": "car", "isthing": 1}, {"id": 9, "name": "road", "isthing": 0}]
    regions = halves(frames=8)  # the longest window of VPQ
    gt = {
        "masks": torch.stack([regions[0], regions[1] | regions[2]]),
        "labels": torch.tensor([0, 1]),
    }
    segments = torch.where(regions[0], 1, 2).to(torch.int32)
    info = [{"id": 1, "label": 0}, {"id": 2, "label": 1}]

    def vpq(segments, info):
        evaluator = VideoPanopticEvaluator(categories)
        evaluator.process(0, gt, {"segments": segments, "segments_info": info})
        return evaluator.evaluate()

    assert vpq(segments, info)["VPQ"] == pytest.approx(100.0)
    switched = segments.clone()
    switched[7][switched[7] == 1] = 3  # the car gets another id in the last frame
    result = vpq(switched, info + [{"id": 3, "label": 0}])
    assert result["windows"]["0"]["Things"]["PQ"] == pytest.approx(100.0)  # frame by frame
    assert result["VPQ_thing"] < 100.0 and result["VPQ_stuff"] == pytest.approx(100.0)


def test_vss_postprocessing_and_evaluator_by_hand():
    regions = halves()
    # Query 0 class 0 on the left; query 1 class 1 on the right; query 2 class 1 nowhere.
    mask_logits = logits_of(
        torch.stack([regions[0], regions[1] | regions[2], regions[0] & False], 1)
    )
    class_logits = class_logits_for([0, 1, 1], frames=2)
    classes = video_semantic_inference(mask_logits, class_logits)
    assert classes.shape == (2, 4, 4)
    assert classes[:, :, :2].eq(0).all() and classes[:, :, 2:].eq(1).all()
    categories = [{"id": 0, "name": "a", "isthing": 0}, {"id": 1, "name": "b", "isthing": 0}]
    evaluator = VideoSemanticEvaluator(categories)
    gt = {
        "masks": torch.stack([regions[0], regions[1] | regions[2]]),
        "labels": torch.tensor([0, 1]),
    }
    evaluator.process(0, gt, classes)
    assert evaluator.evaluate()["mIoU"] == pytest.approx(100.0)
    wrong = VideoSemanticEvaluator(categories)
    wrong.process(0, gt, torch.zeros_like(classes))
    assert wrong.evaluate()["mIoU"] == pytest.approx(25.0)  # class 0: IoU 1/2, class 1: 0


@pytest.mark.parametrize(
    "task, dataset, keys",
    [
        ("vis", "synthetic_video_vis", {"AP", "AR10", "per_class"}),
        ("vps", "synthetic_video_vps", {"VPQ", "VPQ_thing", "VPQ_stuff"}),
        ("vss", "synthetic_video_vss", {"mIoU", "VC8", "VC16"}),
    ],
)
def test_trainer_trains_and_evaluates_on_synthetic_videos(tmp_path_factory, task, dataset, keys):
    from eomt.config import get_cfg
    from eomt.data import generate_synthetic_videos
    from eomt.engine.trainer import Trainer

    data = tmp_path_factory.getbasetemp() / "synthetic_videos"
    generate_synthetic_videos(data, num_train=2, num_val=1, seed=0)  # once: then a no-op
    out = tmp_path_factory.mktemp(task)
    cfg = get_cfg(
        "configs/synthetic/videomt_tiny.yaml",
        [
            f"task={task}",
            f"test.metrics=[{task}]",
            f"dataset.name={dataset}",
            "model.num_classes=0",
            f"dataset.root={data}",
            f"output_dir={out}",
            "model.backbone_kwargs={depth: 3, embed_dim: 32, num_heads: 2}",
            "input.image_size=[32,32]",
            "input.num_frames=2",
            "input.frame_range=0",
            "loss.num_points=64",
            "solver.max_iter=2",
            "solver.batch_size=2",
            "solver.batch_size_per_device=1",
            "dataloader.num_workers=0",
        ],
    )
    results = Trainer(cfg).train()
    assert set(results[task]) >= keys
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert "loss_mask_0" in records[0] and f"{task}/{sorted(keys)[0]}" in records[-1]
    if task == "vis":
        written = json.loads((out / "vis_results.json").read_text())
        assert written and {"video_id", "category_id", "score", "segmentations"} <= set(written[0])


def test_an_image_model_with_a_video_task_is_refused():
    from eomt.config import ConfigError, get_cfg
    from eomt.engine.trainer import check_video_task

    cfg = get_cfg("configs/synthetic/videomt_tiny.yaml", ["model.name=eomt"])
    with pytest.raises(ConfigError, match="video task"):
        check_video_task(cfg)
    cfg = get_cfg("configs/synthetic/videomt_tiny.yaml", ["test.metrics=[vps,panoptic]"])
    with pytest.raises(ConfigError, match="image metrics"):
        check_video_task(cfg)


@pytest.mark.parametrize(
    "name, task, classes, blocks, size, iterations, topk",
    [
        ("ytvis19/videomt_small_640", "vis", 40, 3, 640, 40000, 10),
        ("ytvis19/videomt_base_640", "vis", 40, 3, 640, 40000, 10),
        ("ytvis19/videomt_large_640", "vis", 40, 4, 640, 60000, 10),
        ("ytvis21/videomt_large_640", "vis", 40, 4, 640, 160000, 10),
        ("ovis/videomt_large_640", "vis", 25, 4, 640, 160000, 20),
        ("vipseg/videomt_large_1280", "vps", 124, 4, 1280, 40000, 100),
        ("vspw/videomt_large_1280", "vss", 124, 4, 1280, 40000, 100),
    ],
)
def test_the_authors_recipe(name, task, classes, blocks, size, iterations, topk):
    from eomt.config import get_cfg

    cfg = get_cfg(f"configs/{name}.yaml")
    m, s, i = cfg.model, cfg.solver, cfg.input
    assert (cfg.task, m.name, m.masked_attn, m.num_classes) == (task, "videomt", "never", classes)
    assert (m.num_queries, m.num_query_blocks, m.patch_size) == (200, blocks, 16)
    assert m.weights.startswith("checkpoints/videomt/dinov2_segmenter/")
    assert (i.num_frames, i.frame_range, list(i.image_size)) == (5, 2, [size, size])
    assert (s.batch_size, s.lr, s.weight_decay, s.llrd, s.poly_power) == (8, 1e-4, 0.05, 0.6, 0.9)
    assert (list(s.warmup_iters), s.clip_grad_norm, s.max_iter) == ([500, 1000], 0.01, iterations)
    assert cfg.loss.video_matching == "first_frame" and cfg.test.topk == topk
