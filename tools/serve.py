"""Serve a checkpoint over HTTP: POST an image, get its segments as JSON (COCO RLE masks).

    python tools/serve.py --weights output/synthetic_tiny_panoptic/model_0000600.pth
    python tools/serve.py --weights model.pth --task semantic --max-batch 16 --max-wait-ms 20 \\
        --host 0.0.0.0 --api-key "$SECRET"

    curl --data-binary @photo.jpg http://127.0.0.1:8000/predict            # raw body
    curl -F image=@photo.jpg "http://127.0.0.1:8000/predict?format=png" -o panoptic.png

GET / is a browser page (drop an image, see the overlay); GET /info names the task, classes,
input size, weights (SHA-256) and runtime; GET /health answers while the server runs.
Concurrent requests are predicted in batches of up to --max-batch images collected within
--max-wait-ms; beyond --max-queue waiting images the server answers 503 with Retry-After.
With --api-key (or EOMT_API_KEY) every request needs the key in the X-API-Key header (or
`Authorization: Bearer KEY`, or ?api_key=KEY for the page). SIGTERM or Ctrl-C: the requests in
flight are answered, then the server exits. docs/serving.md has the API and the load figures.
"""

import argparse
import os

import uvicorn

from eomt.cli import ToolParser, run_tool
from eomt.deploy.predictor import add_predictor_arguments, predictor_from_arguments
from eomt.deploy.runtime import check_runtime_arguments
from eomt.deploy.server import Limits, create_app


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_predictor_arguments(parser)
    parser.add_argument("--task", choices=("panoptic", "semantic", "instance"))
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=8, help="images per forward")
    parser.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill"
    )
    parser.add_argument("--max-queue", type=int, default=64, help="images waiting; then 503")
    parser.add_argument("--max-bytes", type=int, default=20 << 20, help="request body limit")
    parser.add_argument("--max-megapixels", type=float, default=50.0, help="image size limit")
    parser.add_argument("--api-key", default=os.environ.get("EOMT_API_KEY"))
    args = parser.parse_args(argv)
    check_runtime_arguments(parser, args)
    for name in ("max_batch", "max_queue", "max_bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_wait_ms < 0 or args.max_megapixels <= 0:
        parser.error("--max-wait-ms must be >= 0 and --max-megapixels > 0")
    return args


def build_app(args):
    predictor = predictor_from_arguments(args)
    limits = Limits(args.max_bytes, args.max_megapixels, args.max_queue)
    return create_app(
        predictor,
        args.task or predictor.cfg.task,
        args.weights,
        args.max_batch,
        args.max_wait_ms,
        limits,
        args.api_key,
    )


def main(args) -> None:
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=60)


if __name__ == "__main__":
    run_tool(main, parse_args)
