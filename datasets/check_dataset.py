"""Check that a dataset root holds what a layout needs, and that samples load.

    python datasets/check_dataset.py NAME ROOT [--splits train val] [--samples 2]
    python datasets/check_dataset.py --config-file CFG [key=value ...]   # its two splits

NAME is a layout of eomt/data/layouts.py (coco_panoptic, coco_instance, ade20k_semantic,
ade20k_panoptic, cityscapes_semantic, synthetic_*). Prints where each piece was found (folder
or archive) or the places looked at, whether every file the annotations list is there, and a
few loaded samples. With --config-file, the training and evaluation splits of that config,
with the files it gives (dataset.train, dataset.test, dataset.classes). Exits with status 1 if
anything is missing or fails to load.
"""

import argparse
import sys

from eomt.config import get_cfg
from eomt.data.build import check_config_dataset
from eomt.data.layouts import DATASET_LAYOUTS, SPLITS, check_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("arguments", nargs="*", help="NAME ROOT, or with --config-file key=value")
    parser.add_argument("--config-file", help="check the dataset of this config instead")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), help="splits to check")
    parser.add_argument("--samples", type=int, default=2, help="samples to load per split")
    args = parser.parse_intermixed_args(argv)
    if args.config_file:
        args.overrides = args.arguments
    elif len(args.arguments) != 2 or args.arguments[0] not in DATASET_LAYOUTS:
        parser.error(
            f"give NAME ROOT (NAME one of {', '.join(sorted(DATASET_LAYOUTS))}), "
            "or --config-file CFG [key=value ...]"
        )
    else:
        args.name, args.root = args.arguments
    return args


def main(args) -> int:
    if args.config_file:
        ok = check_config_dataset(get_cfg(args.config_file, args.overrides), args.samples)
    else:
        ok = check_dataset(args.name, args.root, tuple(args.splits), args.samples)
    print("OK" if ok else "INCOMPLETE: see MISSING/FAILED above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
