"""Runs on the head (``ray submit CLUSTER.yaml scripts/cluster_job.py -- [SUBMIT OPTIONS] COMMAND ...``):
submits the kd-ray command as a Ray job to the head's own job server, from the synced checkout.

`ray submit` copies this file to the head's home folder and runs it from there. The checkout that
``file_mounts`` synced is ``~/kd_ray`` (``KD_RAY_CHECKOUT`` names another): the script works from
it, so a relative ``-c configs/...`` resolves there and that folder is what the job uploads.
Options of ``kd-ray submit`` before COMMAND (``--address``, ``--head-dir``, ``--no-wait``) win
over the defaults here.
"""
import os
import sys
from pathlib import Path

CHECKOUT = Path(os.environ.get("KD_RAY_CHECKOUT", "~/kd_ray")).expanduser()
ADDRESS = "http://127.0.0.1:8265"  # the head's job server, on its loopback (cluster yaml files)

if __name__ == "__main__":
    if not (CHECKOUT / "kd_ray").is_dir():
        sys.exit(f"cluster_job.py: no kd_ray checkout at {CHECKOUT}: sync it with "
                 "`ray rsync-up CLUSTER.yaml` (scripts/cluster_submit.sh does) or set KD_RAY_CHECKOUT")
    os.chdir(CHECKOUT)
    sys.path.insert(0, str(CHECKOUT))  # this checkout's kd_ray, whichever one is installed
    from kd_ray.cli import main

    sys.exit(main(["submit", "--address", ADDRESS, *sys.argv[1:]]))
