"""An HTTP segmentation service around a `Predictor` (FastAPI on uvicorn; `tools/serve.py`).

Requests are decoded in the server's thread pool, wait in one bounded queue and are predicted
in batches: the batcher takes what has arrived, up to `max_batch` images within `max_wait_ms`
of the first, and runs one forward for them on a single inference thread (the event loop keeps
accepting meanwhile). A full queue answers 503 with Retry-After at once; a request whose image
breaks the batched forward is retried alone so that the others of its batch still get their
answer. Responses: the segments as JSON with COCO RLE masks, or the task's PNG.
"""

import asyncio
import hashlib
import hmac
import io
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_utils
from starlette.exceptions import HTTPException
from torchvision.transforms.v2 import functional as TF

from eomt.data.bad_samples import BadSampleError
from eomt.data.images import rgb_pixels
from eomt.evaluation.panoptic_io import id_to_rgb

PAGE = Path(__file__).with_name("page.html")
API_KEY_HEADER = "X-API-Key"


@dataclass
class Limits:
    max_bytes: int = 20 << 20  # request body
    max_megapixels: float = 50.0  # decoded image; checked from the header, before decoding
    max_queue: int = 64  # images waiting for a batch; beyond: 503
    retry_after_s: int = 1


class RequestError(Exception):
    """A request the server refuses: its HTTP status and the reason, sent as {"error": ...}."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


# -- decoding ------------------------------------------------------------------------------------


def decode_image(data: bytes, max_megapixels: float) -> torch.Tensor:
    """Image file bytes -> float32 (3, H, W) in [0, 1], as the predictor reads files (any mode
    as 8-bit RGB, EXIF orientation applied). 400/413/415 with the reason otherwise."""
    if not data:
        raise RequestError(
            400, "empty body: send the image as the request body or as the multipart field 'image'"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise RequestError(413, f"image too large to decode: {error}") from error
    except UnidentifiedImageError as error:
        raise RequestError(
            415, "the body is not an image file (JPEG, PNG, WebP, TIFF, BMP): no known format"
        ) from error
    except Exception as error:  # a header that announces an image but cannot be read
        raise RequestError(
            415, f"the body is not a readable image file ({type(error).__name__}: {error})"
        ) from error
    megapixels = image.width * image.height / 1e6
    if megapixels > max_megapixels:
        raise RequestError(
            413,
            f"image of {image.width}x{image.height} ({megapixels:.1f} megapixels) is larger than "
            f"the server's limit of {max_megapixels:g} megapixels",
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        pixels = rgb_pixels(image, "the request's image")
    except BadSampleError as error:
        raise RequestError(415, str(error)) from error
    except Exception as error:  # truncated or corrupt data
        raise RequestError(
            400, f"the image is corrupt or truncated ({type(error).__name__}: {error})"
        ) from error
    return TF.to_dtype(TF.to_image(pixels), torch.float32, scale=True)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, or the multipart field `image`; 413 beyond `max_bytes` (by the declared
    length before reading, and while reading a body sent without one)."""
    too_large = RequestError(413, f"request body larger than the limit of {max_bytes} bytes")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=8, max_part_size=max_bytes)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "multipart request without a file field 'image'")
        return await upload.read()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# -- encoding ------------------------------------------------------------------------------------


def _rle_segment(mask: np.ndarray) -> dict:
    """Area, [x, y, w, h] box and COCO RLE of a boolean (H, W) mask, by pycocotools."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {
        "area": int(mask_utils.area(rle)),
        "bbox": [int(v) for v in mask_utils.toBbox(rle)],
        "rle": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
    }


def segments_of(task: str, result, categories: list[dict]) -> list[dict]:
    """A `Predictor` result as the response's segments: id, category_id (the dataset's),
    label (contiguous), name, isthing, score (null for semantic), area, bbox, rle."""

    def describe(label: int) -> dict:
        category = categories[label]
        return {
            "category_id": category["id"],
            "label": label,
            "name": category["name"],
            "isthing": int(category.get("isthing", 1)),
        }

    segments = []
    if task == "panoptic":
        seg, entries = result
        seg = seg.cpu().numpy()
        for entry in entries:
            mask = seg == entry["id"]
            if mask.any():
                segments.append(
                    {
                        "id": int(entry["id"]),
                        **describe(int(entry["label"])),
                        "score": float(entry["score"]),
                        **_rle_segment(mask),
                    }
                )
    elif task == "semantic":
        labels = result.cpu().numpy()
        for label in np.unique(labels):
            segments.append(
                {"id": int(label) + 1, **describe(int(label)), "score": None}
                | _rle_segment(labels == label)
            )
    else:
        masks = result["masks"].cpu().numpy().astype(bool)
        for index, (mask, score, label) in enumerate(
            zip(masks, result["scores"].tolist(), result["labels"].tolist())
        ):
            segments.append(
                {"id": index + 1, **describe(label), "score": float(score)} | _rle_segment(mask)
            )
    return segments


def png_of(task: str, result, num_classes: int) -> bytes:
    """The COCO panoptic PNG (ids as R + 256 G + 256^2 B) or the semantic label PNG (16-bit
    above 255 classes), as `tools/predict.py` writes them."""
    if task == "panoptic":
        pixels = id_to_rgb(result[0].cpu().numpy())
    elif task == "semantic":
        pixels = result.cpu().numpy().astype(np.uint8 if num_classes <= 255 else np.uint16)
    else:
        raise RequestError(400, "format=png is for the panoptic and semantic tasks; use JSON")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# -- batching ------------------------------------------------------------------------------------


class Overloaded(Exception):
    pass


class Batcher:
    """Groups concurrent requests into batches for `predict_batch(images) -> results`.

    `forward_calls` counts the calls of `predict_batch` (a retry of one image alone included).
    """

    def __init__(self, predict_batch, max_batch: int, max_wait_ms: float, max_queue: int):
        self.predict_batch = predict_batch
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue(max_queue)
        # One inference thread: batches run one after another, the event loop stays free.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="eomt-inference")
        self.forward_calls = 0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def submit(self, image) -> tuple:
        """(result, batch size, seconds waited, seconds of the batch's prediction)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((image, future, time.perf_counter()))
        except asyncio.QueueFull:
            raise Overloaded() from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            batch = [item for item in batch if not item[1].cancelled()]  # clients gone
            if not batch:
                continue
            started = time.perf_counter()
            outcomes = await loop.run_in_executor(
                self.executor, self._predict, [item[0] for item in batch]
            )
            predicted = time.perf_counter() - started
            for (_, future, queued), outcome in zip(batch, outcomes):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result((outcome, len(batch), started - queued, predicted))

    def _predict(self, images: list) -> list:
        """Results for the batch; if the batch fails, each image alone, so that one bad image
        fails only its own request."""
        try:
            self.forward_calls += 1
            return self.predict_batch(images)
        except Exception:
            if len(images) == 1:
                raise
        outcomes = []
        for image in images:
            try:
                self.forward_calls += 1
                outcomes.append(self.predict_batch([image])[0])
            except Exception as error:
                outcomes.append(error)
        return outcomes


# -- the application -----------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def create_app(
    predictor,
    task: str,
    weights: str | Path,
    max_batch: int = 8,
    max_wait_ms: float = 10.0,
    limits: Limits | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The service: POST /predict, GET /health, GET /info, GET / (the browser page)."""
    limits = limits or Limits()
    batcher = Batcher(
        lambda images: predictor.predict(images, task), max_batch, max_wait_ms, limits.max_queue
    )
    info = {
        "task": task,
        "classes": [
            {"id": c["id"], "label": label, "name": c["name"], "isthing": int(c.get("isthing", 1))}
            for label, c in enumerate(predictor.categories)
        ],
        "input_size": list(predictor.cfg.input.image_size),
        "weights": str(weights),
        "weights_sha256": file_digest(weights) if Path(weights).is_file() else None,
        "runtime": {**predictor.forward.describe(), "device": str(predictor.device)},
        "batching": {"max_batch": max_batch, "max_wait_ms": max_wait_ms},
        "limits": {
            "max_bytes": limits.max_bytes,
            "max_megapixels": limits.max_megapixels,
            "max_queue": limits.max_queue,
        },
    }

    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="EoMT segmentation", lifespan=lifespan)
    app.state.batcher = batcher

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get(API_KEY_HEADER) or request.query_params.get("api_key")
            bearer = request.headers.get("authorization", "")
            if bearer.lower().startswith("bearer "):
                given = given or bearer[7:]
            if not given or not hmac.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(
                    {"error": f"missing or wrong API key (header {API_KEY_HEADER})"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await call_next(request)

    @app.exception_handler(RequestError)
    async def refuse(request: Request, error: RequestError):
        return JSONResponse({"error": str(error)}, status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)  # FastAPI's own refusals (404, a bad multipart body)
    async def refuse_http(request: Request, error: HTTPException):
        return JSONResponse(
            {"error": str(error.detail)}, status_code=error.status_code, headers=error.headers
        )

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": batcher.queue.qsize()}

    @app.get("/info")
    async def get_info():
        return info

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.post("/predict")
    async def predict(request: Request, format: str = "json"):
        if format not in ("json", "png"):
            raise RequestError(400, f"format must be json or png, got {format!r}")
        started = time.perf_counter()
        data = await read_body(request, limits.max_bytes)
        image = await run_in_threadpool(decode_image, data, limits.max_megapixels)
        decoded = time.perf_counter()
        try:
            result, batch_size, waited, predicted = await batcher.submit(image)
        except Overloaded:
            raise RequestError(
                503,
                f"the queue is full ({limits.max_queue} images waiting): retry later",
                {"Retry-After": str(limits.retry_after_s)},
            ) from None
        except Exception as error:  # this image's own failure; the server goes on
            message = f"prediction failed: {type(error).__name__}: {error}"
            raise RequestError(500, message) from error
        answered = time.perf_counter()
        if format == "png":
            png = await run_in_threadpool(png_of, task, result, len(predictor.categories))
            return Response(png, media_type="image/png")
        segments = await run_in_threadpool(segments_of, task, result, predictor.categories)
        height, width = image.shape[-2:]
        return {
            "width": int(width),
            "height": int(height),
            "task": task,
            "segments": segments,
            "batch_size": batch_size,
            "timing_ms": {
                "decode": round((decoded - started) * 1000, 2),
                "queue": round(waited * 1000, 2),
                "predict_batch": round(predicted * 1000, 2),
                "encode": round((time.perf_counter() - answered) * 1000, 2),
                "total": round((time.perf_counter() - started) * 1000, 2),
            },
        }

    return app
