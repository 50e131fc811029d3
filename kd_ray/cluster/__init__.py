"""Orchestration on Ray, the only layer that imports Ray: a stage as a TorchTrainer, the per-worker
loop, the controller-side callbacks, the teacher cache as Ray tasks, Tune sweeps, the pipeline and
job submission."""
