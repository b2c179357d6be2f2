"""Generate the seeded synthetic videos (YouTube-VIS, VIPSeg and VSPW formats).

    python datasets/prepare_synthetic_video.py --output datasets/synthetic_video
    python datasets/prepare_synthetic_video.py --output /tmp/tiny --num-train 4 --num-val 2 --seed 1

Does nothing when OUTPUT already holds complete videos made with the same parameters.
"""

import argparse
import time

from eomt.data.synthetic_video import generate_synthetic_videos


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="dataset root folder")
    parser.add_argument("--num-train", type=int, default=16, help="training videos")
    parser.add_argument("--num-val", type=int, default=4, help="validation videos")
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed (splits use disjoint streams)"
    )
    return parser.parse_args(argv)


def main(args) -> None:
    start = time.perf_counter()
    generated = generate_synthetic_videos(args.output, args.num_train, args.num_val, args.seed)
    if generated:
        elapsed = time.perf_counter() - start
        print(
            f"Wrote {args.num_train} train + {args.num_val} val videos to {args.output} "
            f"in {elapsed:.1f} s"
        )
    else:
        print(f"{args.output} already holds these videos; nothing to do")


if __name__ == "__main__":
    main(parse_args())
