"""Train and evaluate EoMT.

    python tools/train_net.py --config-file configs/synthetic/eomt_tiny_panoptic.yaml
    python tools/train_net.py --config-file CFG --num-gpus 4 solver.lr=2e-4
    python tools/train_net.py --config-file CFG --eval-only model.weights=path/to/model.pth
    python tools/train_net.py --config-file CFG --resume      # continue from the last checkpoint

Multi-node: start one process per GPU with torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK).
"""

import argparse

from eomt.cli import ToolParser, run_tool
from eomt.config import get_cfg
from eomt.distributed import launch
from eomt.engine.trainer import Trainer


def parse_args(argv=None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True, help="YAML config")
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="evaluate model.weights or, with --resume, the last checkpoint "
        "(model.weights=random: the initialised model, on purpose)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last readable checkpoint of output_dir (none: from iteration 0)",
    )
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="processes on this machine (one per GPU)"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides: key=value")
    return parser.parse_intermixed_args(argv)  # overrides before or after the flags


def main(args) -> None:
    cfg = get_cfg(args.config_file, args.overrides)
    trainer = Trainer(cfg)
    if args.eval_only:
        trainer.eval_only(resume=args.resume)
        return
    if args.resume:
        trainer.resume()
    trainer.train()


def launch_main(args) -> None:
    launch(main, args.num_gpus, (args,))


if __name__ == "__main__":
    run_tool(launch_main, parse_args)  # a config error, a missing file: one line, exit 2
