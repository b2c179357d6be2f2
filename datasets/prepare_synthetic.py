"""Generate the seeded synthetic panoptic dataset (COCO panoptic, COCO instance, semantic PNGs).

    python datasets/prepare_synthetic.py --output datasets/synthetic
    python datasets/prepare_synthetic.py --output /tmp/tiny --num-train 16 --num-val 8 --seed 1

Does nothing when OUTPUT already holds a complete dataset made with the same parameters.
"""

import argparse
import time

from eomt.data.synthetic import generate_synthetic_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", required=True, help="dataset root folder")
    parser.add_argument("--num-train", type=int, default=800, help="training images")
    parser.add_argument("--num-val", type=int, default=100, help="validation images")
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed (splits use disjoint streams)"
    )
    return parser.parse_args(argv)


def main(args) -> None:
    start = time.perf_counter()
    generated = generate_synthetic_dataset(args.output, args.num_train, args.num_val, args.seed)
    if generated:
        elapsed = time.perf_counter() - start
        print(
            f"Wrote {args.num_train} train + {args.num_val} val images to {args.output} "
            f"in {elapsed:.1f} s"
        )
    else:
        print(f"{args.output} already holds this dataset; nothing to do")


if __name__ == "__main__":
    main(parse_args())
