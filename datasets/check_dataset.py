"""Check that a dataset root holds what a layout needs, and that samples load.

    python datasets/check_dataset.py NAME ROOT [--splits train val] [--samples 2]

NAME is a layout of eomt/data/layouts.py (coco_panoptic, coco_instance, ade20k_semantic,
ade20k_panoptic, cityscapes_semantic, synthetic_*). Prints where each piece was found (folder
or archive) or the places looked at, whether every file the annotations list is there, and a
few loaded samples. Exits with status 1 if anything is missing or fails to load.
"""

import argparse
import sys

from eomt.data.layouts import DATASET_LAYOUTS, SPLITS, check_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", choices=sorted(DATASET_LAYOUTS), help="dataset layout")
    parser.add_argument("root", help="dataset root folder")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to check")
    parser.add_argument("--samples", type=int, default=2, help="samples to load per split")
    return parser.parse_args(argv)


def main(args) -> int:
    ok = check_dataset(args.name, args.root, tuple(args.splits), args.samples)
    print("OK" if ok else "INCOMPLETE: see MISSING/FAILED above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
