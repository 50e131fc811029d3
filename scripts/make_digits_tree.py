"""Write scikit-learn's digits as an ImageFolder tree of 64 px PNGs (train/ and val/ class folders),
the second dataset of the defaults table and of `kd-ray auto` in the docs (configs/digits64.yaml):

    python scripts/make_digits_tree.py [data/digits64] [--size 64]
"""
import argparse

from kd_ray.data import write_digits_imagefolder

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="data/digits64", help="folder to write (default data/digits64)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    args = parser.parse_args()
    print(f"digits tree in {write_digits_imagefolder(args.root, args.size)}")
