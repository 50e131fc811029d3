"""Runs on the head (``ray submit cluster.yaml scripts/cluster_job.py -- COMMAND ...``): submits
the kd-ray command as a Ray job to the head's own job server, from the checkout in ~/kd_ray."""
import sys

from kd_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", "--address", "http://127.0.0.1:8265", *sys.argv[1:]]))
