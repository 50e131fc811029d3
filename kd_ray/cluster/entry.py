"""What Ray Train runs on every rank, in a module of its own: Train's controller unpickles the
function to start the workers, and importing cluster.worker there (torch, data, models)
would cost it seconds of CPU per run for code only the workers run."""


def train_loop_per_worker(loop_config: dict) -> dict | None:
    from kd_ray.cluster.worker import train_loop_per_worker as run  # on the worker only

    return run(loop_config)
