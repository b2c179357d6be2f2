"""The HTTP service (eomt/deploy/server.py, tools/serve.py) on a tiny random model: its answers
equal the Predictor's, its refusals, batching, overload, an API key, SIGTERM."""

import hashlib
import io
import json
import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image
from pycocotools import mask as mask_utils

from eomt.cli import run_tool
from eomt.deploy.load_test import ServerProcess, free_port, run_load
from eomt.deploy.predictor import Predictor
from eomt.deploy.server import Limits, create_app
from eomt.evaluation.panoptic_io import rgb_to_id
from tests.test_predict_tool import CATEGORIES, save_segmenting_tiny_model
from tools import serve


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_segmenting_tiny_model(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def predictor(weights):
    return Predictor.from_checkpoint(weights, device="cpu")


def png_bytes(height=40, width=56, seed=0, mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


@contextmanager
def serving(app):
    """The app on uvicorn, on a free port of 127.0.0.1, in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def post_all(url: str, bodies: list[bytes], **kwargs) -> list[httpx.Response]:
    """The bodies POSTed at once, one client thread each."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(
            pool.map(lambda body: httpx.post(url, content=body, timeout=60, **kwargs), bodies)
        )


@pytest.mark.parametrize("task", ["panoptic", "semantic", "instance"])
def test_answers_equal_the_predictor(predictor, weights, task):
    body = png_bytes()
    image = Image.open(io.BytesIO(body))
    expected = predictor(image, task)
    with serving(create_app(predictor, task, weights)) as url:
        answer = httpx.post(f"{url}/predict", content=body, timeout=60)
        multipart = httpx.post(f"{url}/predict", files={"image": ("a.png", body)}, timeout=60)
        png = httpx.post(f"{url}/predict?format=png", content=body, timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["width"], result["height"], result["task"]) == (56, 40, task)
    assert multipart.json()["segments"] == result["segments"]
    segments = result["segments"]
    assert segments, "the shifted random model predicts segments"
    masks = [mask_utils.decode(s["rle"]).astype(bool) for s in segments]
    for segment, mask in zip(segments, masks):
        assert segment["area"] == mask.sum()
        assert segment["name"] == CATEGORIES[segment["label"]]["name"]
        assert segment["category_id"] == CATEGORIES[segment["label"]]["id"]
        x, y, w, h = segment["bbox"]
        ys, xs = np.nonzero(mask)
        assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
    if task == "panoptic":
        seg, entries = expected
        seg = seg.numpy()
        kept = [e for e in entries if (seg == e["id"]).any()]
        assert [s["id"] for s in segments] == [e["id"] for e in kept]
        assert [s["score"] for s in segments] == pytest.approx([e["score"] for e in kept])
        for segment, mask in zip(segments, masks):
            assert np.array_equal(mask, seg == segment["id"])
        assert png.headers["content-type"] == "image/png"
        assert np.array_equal(rgb_to_id(np.asarray(Image.open(io.BytesIO(png.content)))), seg)
    elif task == "semantic":
        labels = expected.numpy()
        assert [s["label"] for s in segments] == np.unique(labels).tolist()
        for segment, mask in zip(segments, masks):
            assert np.array_equal(mask, labels == segment["label"])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), labels)
    else:
        assert len(segments) == len(expected["masks"])
        assert [s["score"] for s in segments] == pytest.approx(expected["scores"].tolist())
        assert [s["category_id"] for s in segments] == expected["category_ids"].tolist()
        for segment, mask in zip(segments, expected["masks"].numpy()):
            assert np.array_equal(mask_utils.decode(segment["rle"]).astype(bool), mask)
        assert png.status_code == 400 and "panoptic and semantic" in png.json()["error"]


def test_image_modes_as_the_predictor_reads_them(predictor, weights):
    """Grey, RGBA, palette and 16-bit images: the same segments as the Predictor on the file."""
    grey16 = io.BytesIO()
    Image.fromarray(np.arange(40 * 56, dtype=np.uint16).reshape(40, 56) * 29).save(grey16, "PNG")
    bodies = [png_bytes(mode=m) for m in ("L", "RGBA", "P")] + [grey16.getvalue()]
    with serving(create_app(predictor, "panoptic", weights)) as url:
        answers = [httpx.post(f"{url}/predict", content=b, timeout=60) for b in bodies]
    for body, answer, path in zip(bodies, answers, ("l", "rgba", "p", "i16")):
        file = Path(f"/tmp/eomt_serve_{os.getpid()}_{path}.png")
        file.write_bytes(body)
        try:
            seg, entries = predictor(file)
        finally:
            file.unlink()
        assert answer.status_code == 200, answer.text
        assert [s["id"] for s in answer.json()["segments"]] == [
            e["id"] for e in entries if (seg == e["id"]).any()
        ]


def test_each_refusal_says_why(predictor, weights):
    limits = Limits(max_bytes=30_000, max_megapixels=0.01, max_queue=4)
    truncated = png_bytes()[:200]
    big = io.BytesIO()
    Image.new("RGB", (120, 100)).save(big, "PNG")  # 0.012 megapixels in a few hundred bytes
    app = create_app(predictor, "panoptic", weights, limits=limits)
    with serving(app) as url:
        cases = {
            "empty": httpx.post(f"{url}/predict", content=b""),
            "text": httpx.post(f"{url}/predict", content=b"hello, not an image"),
            "truncated": httpx.post(f"{url}/predict", content=truncated),
            "bytes": httpx.post(f"{url}/predict", content=b"x" * 40_000),
            "pixels": httpx.post(f"{url}/predict", content=big.getvalue()),
            "format": httpx.post(f"{url}/predict?format=xml", content=png_bytes()),
            "field": httpx.post(f"{url}/predict", files={"photo": ("a.png", png_bytes())}),
            "path": httpx.get(f"{url}/nothing"),
        }
        healthy = httpx.get(f"{url}/health")
    expected = {
        "empty": (400, "empty body"),
        "text": (415, "not an image file"),
        "truncated": (400, "corrupt or truncated"),
        "bytes": (413, "larger than the limit of 30000 bytes"),
        "pixels": (413, "120x100 (0.0 megapixels) is larger than the server's limit of 0.01"),
        "format": (400, "format must be json or png"),
        "field": (400, "without a file field 'image'"),
        "path": (404, "Not Found"),
    }
    for name, (status, message) in expected.items():
        assert cases[name].status_code == status, (name, cases[name].text)
        assert message in cases[name].json()["error"], (name, cases[name].text)
    assert healthy.json()["status"] == "ok"


def test_api_key(predictor, weights):
    with serving(create_app(predictor, "panoptic", weights, api_key="s3cret")) as url:
        missing = httpx.get(f"{url}/info")
        wrong = httpx.post(f"{url}/predict", content=png_bytes(), headers={"X-API-Key": "no"})
        header = httpx.get(f"{url}/health", headers={"X-API-Key": "s3cret"})
        bearer = httpx.get(f"{url}/info", headers={"Authorization": "Bearer s3cret"})
        query = httpx.get(f"{url}/?api_key=s3cret")
    assert missing.status_code == wrong.status_code == 401
    assert "API key" in missing.json()["error"]
    assert header.status_code == bearer.status_code == query.status_code == 200


def test_info_names_the_model(predictor, weights):
    with serving(create_app(predictor, "semantic", weights, max_batch=3)) as url:
        info = httpx.get(f"{url}/info").json()
        page = httpx.get(url)
    assert info["task"] == "semantic"
    assert [c["name"] for c in info["classes"]] == [c["name"] for c in CATEGORIES]
    assert [c["id"] for c in info["classes"]] == [c["id"] for c in CATEGORIES]
    assert info["weights_sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert info["input_size"] == [32, 32] and info["batching"]["max_batch"] == 3
    assert info["runtime"]["precision"] == "fp32"
    assert page.headers["content-type"].startswith("text/html") and "<canvas" in page.text


def test_concurrent_requests_ride_in_one_batch(predictor, weights):
    app = create_app(predictor, "panoptic", weights, max_batch=4, max_wait_ms=2000)
    batcher = app.state.batcher
    with serving(app) as url:
        answers = post_all(f"{url}/predict", [png_bytes(seed=s) for s in range(4)])
        calls_for_four = batcher.forward_calls
        answers += post_all(f"{url}/predict", [png_bytes(seed=s) for s in range(4, 8)][:3])
    assert [a.status_code for a in answers] == [200] * 7
    assert calls_for_four == 1  # a full batch leaves without waiting out max_wait_ms
    assert [a.json()["batch_size"] for a in answers] == [4] * 4 + [3] * 3
    assert batcher.forward_calls == 2
    # Each image's answer is its own, whatever it rode with.
    alone = predictor(Image.open(io.BytesIO(png_bytes(seed=2))), "panoptic")
    assert [s["id"] for s in answers[2].json()["segments"]] == [
        e["id"] for e in alone[1] if (alone[0] == e["id"]).any()
    ]


def test_a_failing_request_does_not_take_down_its_batch(predictor, weights, monkeypatch):
    """An image whose prediction raises (here: any 13-pixel-wide one) fails alone with 500;
    the others of its batch are answered, and the server goes on."""
    real = predictor.predict

    def predict(images, task=None):
        if any(image.shape[-1] == 13 for image in images):
            raise RuntimeError("this image breaks the model")
        return real(images, task)

    monkeypatch.setattr(predictor, "predict", predict)
    app = create_app(predictor, "panoptic", weights, max_batch=3, max_wait_ms=2000)
    bodies = [png_bytes(seed=1), png_bytes(width=13), png_bytes(seed=2)]
    with serving(app) as url:
        answers = post_all(f"{url}/predict", bodies)
        after = httpx.post(f"{url}/predict", content=png_bytes(seed=3), timeout=60)
    assert [a.status_code for a in answers] == [200, 500, 200]
    assert "RuntimeError: this image breaks the model" in answers[1].json()["error"]
    assert after.status_code == 200
    assert app.state.batcher.forward_calls == 1 + 3 + 1  # the batch, each alone, the next


def test_a_full_queue_answers_503_at_once(predictor, weights, monkeypatch):
    real = predictor.predict

    def slow(images, task=None):
        time.sleep(0.5)
        return real(images, task)

    monkeypatch.setattr(predictor, "predict", slow)
    limits = Limits(max_queue=2)
    app = create_app(predictor, "panoptic", weights, max_batch=1, max_wait_ms=0, limits=limits)
    with serving(app) as url:
        started = time.perf_counter()
        answers = post_all(f"{url}/predict", [png_bytes(seed=s) for s in range(8)])
        took = time.perf_counter() - started
    statuses = sorted(a.status_code for a in answers)
    # One in the forward, two in the queue (the forward may take the first before the others
    # arrive, making room for one more): the rest is refused, not kept waiting.
    assert statuses.count(200) in (3, 4) and set(statuses) == {200, 503}
    refused = next(a for a in answers if a.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "queue is full" in refused.json()["error"]
    assert took < 0.5 * 8  # the refused did not wait for a forward


def test_sigterm_answers_requests_in_flight_then_exits(weights, tmp_path):
    log = tmp_path / "server.log"
    arguments = ["--weights", str(weights), "--max-batch", "8", "--max-wait-ms", "1500"]
    server = ServerProcess(arguments, free_port(), log)
    try:
        with ThreadPoolExecutor(3) as pool:
            pending = [
                pool.submit(
                    httpx.post, f"{server.url}/predict", content=png_bytes(seed=s), timeout=60
                )
                for s in range(3)
            ]
            time.sleep(0.5)  # the three wait in the batch window of 1.5 s
            server.process.send_signal(signal.SIGTERM)
            answers = [p.result() for p in pending]
        code = server.process.wait(timeout=60)
    finally:
        server.stop()
    output = log.read_text()
    assert [a.status_code for a in answers] == [200] * 3, output
    assert all(a.json()["batch_size"] == 3 for a in answers)
    # uvicorn exits by the signal it handled, after its graceful shutdown (as managers expect)
    assert code == -signal.SIGTERM and "Application shutdown complete" in output, output


def test_serve_tool_user_errors(tmp_path, capsys):
    """One line `error: ...`, exit status 2, for a missing checkpoint and a bad option."""
    missing = tmp_path / "none.pth"
    for argv, line in (
        (["--weights", str(missing)], f"error: checkpoint not found: {missing}"),
        (["--weights", "x", "--max-batch", "0"], "error: --max-batch must be at least 1"),
    ):
        with pytest.raises(SystemExit) as stopped:
            run_tool(serve.main, serve.parse_args, argv)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines() == [line]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COUNT_PAINTED = """() => { const c = document.getElementById('overlay');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }"""


def test_browser_page(predictor, weights, tmp_path):
    """In Debian's chromium: upload an image, the overlay paints exactly the segments' pixels
    (the page's RLE decoder), the legend names them, a toggle hides one, hovering names it,
    the JSON downloads; a screenshot is saved (EOMT_PAGE_SCREENSHOT names where)."""
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(height=180, width=240, seed=5))
    screenshot = Path(os.environ.get("EOMT_PAGE_SCREENSHOT", tmp_path / "page.png"))
    with serving(create_app(predictor, "panoptic", weights, api_key="k")) as url:
        expected = httpx.post(
            f"{url}/predict", content=image.read_bytes(), headers={"X-API-Key": "k"}
        )
        segments = expected.json()["segments"]
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(f"{url}/?api_key=k")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("body[data-state=drawn]", timeout=60_000)
            names = page.locator("#legend .name").all_inner_texts()
            painted = page.evaluate(COUNT_PAINTED)
            # Hover the first pixel (in reading order) of the first segment.
            mask = mask_utils.decode(segments[0]["rle"]).astype(bool)
            y, x = (int(v[0]) for v in np.nonzero(mask))
            box = page.locator("#overlay").bounding_box()
            scale = box["width"] / 240
            page.mouse.move(box["x"] + (x + 0.5) * scale, box["y"] + (y + 0.5) * scale)
            tooltip = page.locator("#tooltip").inner_text()
            page.screenshot(path=str(screenshot))
            page.locator("#legend input").first.uncheck()
            page.wait_for_function("document.body.dataset.state === 'drawn'")
            painted_without_first = page.evaluate(COUNT_PAINTED)
            with page.expect_download() as download:
                page.click("#download")
            downloaded = json.loads(Path(download.value.path()).read_text())
            browser.close()
    assert names == [f"{s['name']} {s['score']:.2f}" for s in segments]
    assert painted == sum(s["area"] for s in segments)
    assert painted_without_first == painted - segments[0]["area"]
    assert tooltip == names[0]
    assert downloaded["segments"] == segments
    assert screenshot.stat().st_size > 10_000


def test_load_test_counts_every_request(predictor, weights):
    """tools/benchmark_serve.py's clients: every request counted once, by its outcome; the
    bound in time stops the clients."""
    app = create_app(predictor, "panoptic", weights, max_batch=1, limits=Limits(max_queue=1))
    with serving(app) as url:
        loaded = run_load(f"{url}/predict", [png_bytes(seed=s) for s in range(3)], 6, 12, 60)
        none = run_load(f"{url}/predict", [png_bytes()], 2, 10, 0)
    row = loaded.row()
    assert row["requests"] == 12 == row["ok"] + row["503"]
    assert row["errors"] == row["timeouts"] == 0 and row["ok"] == len(loaded.latencies) > 0
    assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert none.row()["requests"] == 0
