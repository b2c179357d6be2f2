"""Video prediction (eomt/deploy/video.py, tools/predict.py --video / --frames) with a tiny
random VidEoMT saved as the trainer saves checkpoints, on synthetic videos written with PyAV."""

import json
import multiprocessing
import re
import resource
import tracemalloc
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from eomt.cli import run_tool
from eomt.config import get_cfg
from eomt.deploy.predictor import Predictor
from eomt.deploy.video import (
    VideoSource,
    VideoStream,
    stable_panoptic,
    write_video_predictions,
)
from eomt.engine.checkpoint import save_training_state
from eomt.evaluation.postprocess import panoptic_inference
from eomt.evaluation.video_instance import evaluate_files
from eomt.inference import resize_and_pad
from eomt.modeling import build_model
from eomt.weights.files import save_weights
from tests.test_weights import tiny_model
from tools.predict import main, parse_args

av = pytest.importorskip("av")

CLASSES, QUERIES, SIZE = 3, 6, 32
CATEGORIES = [
    {"id": 5 + i, "name": f"class{i}", "isthing": int(i < 2), "color": [80 * i, 200, 90]}
    for i in range(CLASSES)
]
WINNER, WINNER_CLASS = 2, 1  # the query that wins every frame, and its class


def tiny_videomt_cfg(task="panoptic"):
    return get_cfg(
        overrides={
            "task": task,
            "model.name": "videomt",
            "model.masked_attn": "never",
            "model.backbone": "vit_small_patch14_reg4_dinov2",
            "model.backbone_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2},
            "model.pretrained": False,
            "model.patch_size": 8,
            "model.num_classes": CLASSES,
            "model.num_queries": QUERIES,
            "model.num_query_blocks": 2,
            "input.image_size": [SIZE, SIZE],
            "test.score_threshold": 0.0,
            "test.overlap_threshold": 0.0,
        }
    )


def stable_videomt(task="panoptic"):
    """A tiny VidEoMT whose identities are stable by construction: the query updater is zero
    (each frame starts from the learned queries), query WINNER carries a large component that
    the class head reads as WINNER_CLASS, the others read as no-object, and every query's mask
    covers the frame (pixel features a constant 0.3, mask embeddings' sum positive)."""
    cfg = tiny_videomt_cfg(task)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.query_updater.weight.zero_()
        model.query_updater.bias.zero_()
        model.queries.weight.mul_(0.1)
        model.queries.weight[WINNER, 0] = 50.0
        model.class_head.weight.zero_()
        model.class_head.bias.zero_()
        model.class_head.bias[CLASSES] = 2.0  # no-object for a query without the component
        model.class_head.weight[WINNER_CLASS, 0] = 3.0  # normalised component ~ sqrt(32)
        model.upscale[-1].norm.weight.zero_()
        model.upscale[-1].norm.bias.fill_(0.3)
        model.mask_head[-1].weight.zero_()
        model.mask_head[-1].bias.fill_(0.5)
    return model, cfg


def save_as_trainer(model, cfg, folder):
    """A training checkpoint as `Trainer.state_dict` and `save_training_state` write it."""
    state = {
        "model": model.state_dict(),
        "optimizer": {},
        "scheduler": {},
        "iteration": 10,
        "cfg": OmegaConf.to_container(cfg),
        "categories": CATEGORIES,
    }
    return save_training_state(folder, 10, state)


def moving_square_frames(count, height=40, width=56):
    """A white square moving right on a dark background, uint8 (H, W, 3) per frame."""
    for t in range(count):
        frame = np.full((height, width, 3), 20, dtype=np.uint8)
        x = 4 + (2 * t) % (width - 16)
        frame[10:22, x : x + 12] = 235
        yield frame


def write_video(path, count, height=40, width=56, rate=12):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in moving_square_frames(count, height, width):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, cfg = stable_videomt()
    return save_as_trainer(model, cfg, tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "square.mp4", 12)


def run(*argv):
    return run_tool(main, parse_args, ["--quiet", *map(str, argv)])


def test_panoptic_video_ids_stable_files_and_overlay(checkpoint, video_file, tmp_path, capsys):
    out = tmp_path / "out"
    summary = run("--weights", checkpoint, "--video", video_file, "--output", out)
    assert summary.frames == 12 and summary.fps > 0 and summary.model_fps > 0
    pngs = sorted((out / "panoptic").iterdir())
    assert [p.stem for p in pngs] == [f"{t:06d}" for t in range(12)]
    content = json.loads((out / "panoptic.json").read_text())
    assert len(content["images"]) == len(content["annotations"]) == 12
    for annotation in content["annotations"]:
        ids = [(s["id"], s["category_id"]) for s in annotation["segments_info"]]
        assert ids == [(WINNER + 1, CATEGORIES[WINNER_CLASS]["id"])]  # the same id every frame
    from eomt.evaluation.panoptic_io import read_panoptic_png

    assert set(np.unique(read_panoptic_png(pngs[5])).tolist()) == {WINNER + 1}
    info = json.loads((out / "video.json").read_text())
    assert info["frames"] == 12 and (info["height"], info["width"]) == (40, 56)
    assert info["frame_rate"] == 12 and info["frames_per_second"] > 0
    with av.open(str(out / "overlay.mp4")) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 12 and (frames[0].height, frames[0].width) == (120, 168)  # 3x
    printed = capsys.readouterr().out
    assert printed.startswith("12 frames in ") and "frames/s end to end" in printed


def test_instance_results_are_youtube_vis_and_score(checkpoint, video_file, tmp_path):
    out = tmp_path / "out"
    run("--weights", checkpoint, "--video", video_file, "--output", out, "--task", "instance",
        "--video-id", "3", "--max-tracks", "4", "--no-overlay")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 4 and not (out / "overlay.mp4").exists()
    assert not (out / "tracks.spool").exists()
    best = results[0]
    assert best["query"] == WINNER and best["category_id"] == CATEGORIES[WINNER_CLASS]["id"]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert len(best["segmentations"]) == 12 and all(best["segmentations"])
    assert mask_utils.decode(best["segmentations"][0]).shape == (40, 56)
    # Readable by the YouTube-VIS evaluation: the best track as ground truth scores AP 100.
    gt = {
        "videos": [{"id": 3, "height": 40, "width": 56, "length": 12}],
        "categories": [{"id": c["id"], "name": c["name"]} for c in CATEGORIES],
        "annotations": [
            {
                "id": 1,
                "video_id": 3,
                "category_id": best["category_id"],
                "segmentations": best["segmentations"],
                "areas": [int(mask_utils.area(s)) for s in best["segmentations"]],
                "iscrowd": 0,
            }
        ],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    summary, _ = evaluate_files(str(tmp_path / "gt.json"), str(out / "results.json"))
    assert summary["AP"] == pytest.approx(100.0)


def test_track_scores_average_the_class_logits_over_frames(checkpoint, video_file):
    """Each frame's class probabilities: the softmax of each query's class logits averaged
    over the frames so far; results.json's (the top tracks): over the whole video."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    stream = predictor.video_stream("instance", max_tracks=3)
    size = tuple(predictor.cfg.input.image_size)
    logits = []
    for _, frame in VideoSource(video_file):
        result = stream.predict(frame)
        with torch.no_grad():  # the updater is zero: every frame starts from the learned queries
            prediction, _ = predictor.model.step(resize_and_pad(frame, size)[0][None])
        logits.append(prediction["class_logits"][0])
        expected = torch.stack(logits).mean(0).softmax(-1)
        assert torch.allclose(result.class_probs, expected, atol=1e-5)
        assert result.result["queries"][0] == WINNER
        assert result.result["masks"].shape == (3, 40, 56)
    assert stream.frames == 12


def test_frames_folder_semantic_and_names(checkpoint, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, pixels in enumerate(moving_square_frames(5)):
        Image.fromarray(pixels).save(folder / f"f{t:03d}.jpg")
    out = tmp_path / "out"
    run("--weights", checkpoint, "--frames", folder, "--output", out, "--task", "semantic",
        "--frame-rate", "5")  # fmt: skip
    names = sorted(p.name for p in (out / "semantic").iterdir())
    assert names == [f"f{t:03d}.png" for t in range(5)]
    labels = np.asarray(Image.open(out / "semantic" / "f002.png"))
    assert labels.shape == (40, 56) and set(np.unique(labels).tolist()) == {WINNER_CLASS}
    info = json.loads((out / "video.json").read_text())
    assert info["kind"] == "frames" and info["frame_rate"] == 5 and info["frames"] == 5


def test_streaming_equals_the_clip_forward(tmp_path):
    """A random VidEoMT (propagation on): the stream's frames are the model's clip forward."""
    cfg = tiny_videomt_cfg()
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    predictor = Predictor(model, cfg, CATEGORIES, device="cpu")
    stream = predictor.video_stream()
    frames = [torch.from_numpy(f).permute(2, 0, 1) / 255 for f in moving_square_frames(4, 32, 32)]
    with torch.no_grad():
        clip = model(torch.stack(frames)[None])
    for t, frame in enumerate(frames):
        stream.predict(frame)
        mean = torch.stack([clip[i]["class_logits"][0] for i in range(t + 1)]).mean(0)
        assert torch.allclose(stream.mean_class_logits(), mean, atol=1e-5)


def test_stable_panoptic_is_panoptic_inference_with_query_ids():
    generator = torch.Generator().manual_seed(0)
    is_thing = [True, True, False]
    for _ in range(5):
        mask_logits = torch.randn(QUERIES, 20, 24, generator=generator) * 3
        class_logits = torch.randn(QUERIES, CLASSES + 1, generator=generator) * 2
        probs = class_logits.softmax(-1)
        seg, segments = stable_panoptic(mask_logits, probs, is_thing, 0.3, 0.5)
        reference, ref_segments = panoptic_inference(mask_logits, class_logits, is_thing, 0.3, 0.5)
        # The same partition, with ids from the queries.
        pairs = set(zip(seg.flatten().tolist(), reference.flatten().tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})
        assert len(segments) == len(ref_segments)
        for segment in segments:
            if segment["isthing"]:
                assert segment["queries"] == [segment["id"] - 1]
            else:
                assert segment["id"] == QUERIES + 1 + segment["label"]


def memory_figures(checkpoint) -> dict:
    """250 frames of 96 x 128 after 50 through a stream, then a control that keeps each frame's
    prediction: the state's sizes, the growth of Python objects (tracemalloc) and of the
    resident memory (MiB) of each. Run in a fresh process: in one that freed much memory
    before (the whole suite), the control's tensors reuse freed pages and RSS stays put."""
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    frames = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(t)) for t in range(4)]

    def run_frames(stream, count, keep=None):
        for t in range(count):
            prediction = stream.predict(frames[t % 4])
            if keep is not None:
                keep.append(prediction)

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    stream = VideoStream(predictor, "instance")
    run_frames(stream, 50)  # warm: allocator pools, lazy imports
    sizes_before = {k: v.nbytes for k, v in stream.state_tensors().items()}
    tracemalloc.start()
    before_python = tracemalloc.get_traced_memory()[0]
    before_rss = rss_mib()
    run_frames(stream, 250)
    figures = {
        "python_growth": tracemalloc.get_traced_memory()[0] - before_python,
        "rss_growth": rss_mib() - before_rss,
        "sizes_before": sizes_before,
        "sizes_after": {k: v.nbytes for k, v in stream.state_tensors().items()},
        "frames": stream.frames,
    }
    tracemalloc.stop()
    kept = []
    control = VideoStream(predictor, "instance")
    before_rss = rss_mib()
    run_frames(control, 150, keep=kept)
    figures["control_rss_growth"] = rss_mib() - before_rss
    return figures


def test_memory_stays_flat_over_hundreds_of_frames(checkpoint):
    """The stream's state keeps its size, Python objects do not grow and the resident memory
    grows by less than 8 MiB over 250 frames; the control, a caller that keeps each frame's
    prediction (its K query masks among it), grows past that bound within 150 frames, so the
    measurement would see kept predictions."""
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        figures = pool.submit(memory_figures, checkpoint).result()
    bound_mib = 8
    sizes = figures["sizes_before"]
    assert figures["sizes_after"] == sizes
    assert sizes == {"queries": QUERIES * 32 * 4, "class_logit_sum": QUERIES * (CLASSES + 1) * 4}
    assert figures["frames"] == 300
    assert figures["python_growth"] < 256 << 10, figures
    assert figures["rss_growth"] < bound_mib, figures
    assert figures["control_rss_growth"] > bound_mib, figures


def test_whole_video_memory_with_files(tmp_path):
    """write_video_predictions over 300 frames (instance: every query's masks kept until the
    end, on disk): Python objects allocated from frame 50 on do not grow with the frames."""
    model, cfg = stable_videomt("instance")
    predictor = Predictor(model, cfg, CATEGORIES, device="cpu")
    video = write_video(tmp_path / "long.mp4", 300, 32, 32, rate=25)
    traced = []

    def watch(frame):
        if frame.index == 49:
            tracemalloc.start()
        if frame.index in (49, 299):
            traced.append(tracemalloc.get_traced_memory()[0])

    try:
        summary = write_video_predictions(
            predictor, video, tmp_path / "out", overlay=False, progress=False, on_frame=watch
        )
    finally:
        tracemalloc.stop()
    assert summary.frames == 300 and summary.files["results.json"].is_file()
    assert traced[1] - traced[0] < 256 << 10, traced
    results = json.loads(summary.files["results.json"].read_text())
    assert len(results) == 10 and all(len(r["segmentations"]) == 300 for r in results)


def test_refusals(checkpoint, tmp_path, capsys):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(SystemExit):
        run("--weights", checkpoint, "--video", missing, "--output", tmp_path / "out")
    assert f"{missing}: no such video file or folder of frames" in capsys.readouterr().err
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 50)
    with pytest.raises(SystemExit):
        run("--weights", checkpoint, "--video", broken, "--output", tmp_path / "out")
    assert f"error: {broken}: cannot be read as a video" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        run("--weights", checkpoint, "--frames", empty, "--output", tmp_path / "out")
    assert "no images" in capsys.readouterr().err
    # An image model: refused, with what to do instead.
    model, cfg = tiny_model(classes=CLASSES)
    image_weights = save_weights(model, cfg, CATEGORIES, tmp_path / "image.safetensors")
    video = write_video(tmp_path / "v.mp4", 2)
    with pytest.raises(SystemExit):
        run("--weights", image_weights, "--video", video, "--output", tmp_path / "out")
    error = capsys.readouterr().err
    assert "needs a VidEoMT checkpoint (model.name videomt)" in error and "'eomt'" in error
    with pytest.raises(ValueError, match="needs a VidEoMT checkpoint"):
        Predictor.from_checkpoint(image_weights, device="cpu").video_stream()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--video", "v.mp4", "--tile", "16"], "--tile: for images"),
        (["--frames", "d", "--show-queries", "2"], "--show-queries: for images"),
        (["--video", "v.mp4", "--compile"], "--compile: for images"),
        (["--input", "d", "--video-id", "3"], "--video-id and --frame-rate are for --video"),
        (["--input", "d", "--video", "v.mp4"], "not allowed with argument"),
    ],
)
def test_argument_checks(extra, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--weights", "w.pth", "--output", "out", *extra])
    assert message in capsys.readouterr().err


def test_benchmark_times_videomt_per_frame_at_eomt_cost_plus_the_updater(capsys):
    """tools/benchmark.py with model.name videomt: one streaming step per frame, whose FLOPs
    are the image EoMT's (no masking) plus the query updater's K x D x D."""
    from eomt.benchmark import VideoStep, count_flops
    from tools.benchmark import main as benchmark_main
    from tools.benchmark import parse_args as benchmark_args

    video_cfg = tiny_videomt_cfg()
    image_cfg = tiny_videomt_cfg()
    image_cfg.model.name = "eomt"
    torch.manual_seed(0)
    video = build_model(video_cfg).eval()
    image = build_model(image_cfg).eval()
    images = torch.rand(1, 3, SIZE, SIZE)
    extra = count_flops(VideoStep(video), images)["flops"] - count_flops(image, images)["flops"]
    assert extra == QUERIES * 32 * 32
    with torch.no_grad():  # the step with the learned queries carried: EoMT's first frame
        image.load_state_dict(video.state_dict(), strict=False)
        (step,) = VideoStep(video)(images)
        assert torch.allclose(step["class_logits"], image(images)[-1]["class_logits"], atol=1e-5)
    config = "configs/synthetic/eomt_tiny_panoptic.yaml"
    overrides = ["model.name=videomt", "model.masked_attn=never"]
    argv = ["--config-file", config, *overrides, "--fps", "--warmup", "1", "--iterations", "2"]
    benchmark_main(benchmark_args(argv))
    record = json.loads(capsys.readouterr().out)
    assert record["per"].startswith("video frame") and record["fps"] > 0
    assert record["fps_measure"].startswith("video frames per second")
    assert record["relative_error"] < 1e-5 and record["gflops"] > 0


def test_gpu_check_videomt_step_in_its_dry_run(tmp_path, capsys):
    """tools/gpu_check.py's videomt step at the dry run's tiny sizes: VidEoMT-L 640 per frame
    beside the authors' 160 FPS, and the image EoMT with the same option."""
    from eomt import gpu_check as checks

    record = checks.run_checks("cpu", tmp_path, 1000, ["videomt"])
    assert record["failed_steps"] == []
    rows = record["steps"]["videomt"]
    entry = rows[checks.VIDEOMT]
    assert entry["agrees"] and entry["fps"] > 0 and entry["paper_fps"] == 160
    assert entry["overrides"] == checks.VIDEOMT_OVERRIDES
    assert rows["EoMT-L 640 w/o masking"]["fps"] > 0
    assert rows["videomt_frame_over_eomt_image_ms"] > 0
    table = capsys.readouterr().out
    assert "| VidEoMT-L 640 (per frame) | " in table and "| 160 | " in table
    assert "VidEoMT-L 640 frame / EoMT-L 640 image (no masking, fp32)" in table


def test_benchmark_video_tool(capsys):
    from tools.benchmark_video import main as video_main
    from tools.benchmark_video import parse_args as video_args

    argv = ["--config-file", "configs/synthetic/eomt_tiny_panoptic.yaml", "--rounds", "2"]
    argv += ["--memory-frames", "6", "--frame-size", "24", "32", "model.num_queries=5"]
    record = video_main(video_args(argv))
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(record))
    cost = record["frame_cost"]
    assert cost["eomt_median_ms"] > 0 and cost["videomt_median_ms"] > 0 and cost["rounds"] == 2
    assert "load average" in cost["load_before"]
    memory = record["memory"]
    assert list(memory["rss_mib_after_frames"]) == [3, 6]
    assert memory["state_bytes"]["queries"] == 5 * 192 * 4  # (1, K, D) float32, ViT-Ti D 192


def test_track_spool_round_trip(tmp_path):
    """The spool's RLEs are pycocotools' own of each query's mask; empty masks are null."""
    from eomt.deploy.video import TrackSpool

    generator = torch.Generator().manual_seed(0)
    frames = [torch.rand(5, 37, 53, generator=generator) > 0.6 for _ in range(3)]
    frames[1][2] = False
    spool = TrackSpool(tmp_path / "spool")
    for masks in frames:
        spool.add(masks)
    tracks = spool.tracks([0, 2, 4])
    spool.remove()
    assert not (tmp_path / "spool").exists()
    for query, segmentations in tracks.items():
        for masks, rle in zip(frames, segmentations):
            if query == 2 and masks is frames[1]:
                assert rle is None
                continue
            expected = mask_utils.encode(np.asfortranarray(masks[query].numpy(), np.uint8))
            assert rle == {"size": [37, 53], "counts": expected["counts"].decode("ascii")}


def test_a_frame_that_cannot_be_decoded_stops_the_run_naming_it(checkpoint, tmp_path, capsys):
    """Zeroed bytes in the middle of a file: the error names the file and the frame, and no
    partial panoptic.json or overlay.mp4 is left (the PNGs of the frames before it are)."""
    data = bytearray(write_video(tmp_path / "v.mp4", 30).read_bytes())
    third = len(data) // 3
    data[third : third + 400] = bytes(400)
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        run("--weights", checkpoint, "--video", damaged, "--output", out)
    error = capsys.readouterr().err
    assert re.search(f"error: {damaged}: frame \\d+ cannot be decoded", error), error
    assert [p.name for p in out.iterdir()] == ["panoptic"]  # no partial JSON or video
    assert 0 < len(list((out / "panoptic").iterdir())) < 30


@pytest.mark.parametrize(
    "video_task, frame_task", [("vps", "panoptic"), ("vss", "semantic"), ("vis", "instance")]
)
def test_a_video_task_checkpoint_predicts_as_its_image_task(
    tmp_path, video_file, video_task, frame_task
):
    """A checkpoint trained on a video task (task vps / vss / vis, as make demo-video's) predicts
    a video without --task: its frames are written as the image task's."""
    model, cfg = stable_videomt(video_task)
    weights = save_as_trainer(model, cfg, tmp_path / "run")
    assert VideoStream(Predictor.from_checkpoint(weights, device="cpu")).task.name == frame_task
    out = tmp_path / "out"
    run("--weights", weights, "--video", video_file, "--output", out, "--no-overlay", "--quiet")
    assert json.loads((out / "video.json").read_text())["task"] == frame_task
