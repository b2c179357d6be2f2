"""Make ADE20K panoptic annotations (COCO panoptic format) from the official ADE20K files.

    python datasets/prepare_ade20k_panoptic.py ROOT [--output DIR] [--workers 8]

ROOT holds ADEChallengeData2016/ or ADEChallengeData2016.zip (images and semantic annotations)
and the instance annotations: annotations_instance.tar as downloaded, or its annotations_instance/
folder extracted into ROOT or into ADEChallengeData2016/. Writes ade20k_panoptic_{train,val}.json
and ade20k_panoptic_{train,val}/*.png into DIR (default ROOT), where the ade20k_panoptic layout
reads them. The conversion is described in eomt/data/ade20k_panoptic.py and datasets/README.md.
"""

import argparse
import time

from eomt.data.ade20k_panoptic import convert_ade20k_panoptic
from eomt.data.layouts import SPLITS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="folder holding the ADE20K files")
    parser.add_argument("--output", default=None, help="output folder (default: ROOT)")
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--workers", type=int, default=1, help="processes converting images")
    return parser.parse_args(argv)


def main(args) -> None:
    start = time.perf_counter()
    written = convert_ade20k_panoptic(
        args.root, args.output, tuple(args.splits), args.workers, show_progress=True
    )
    for json_path in written:
        print(f"Wrote {json_path} and {json_path.with_suffix('')}/")
    print(f"Done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(parse_args())
