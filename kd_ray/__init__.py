"""kd_ray: knowledge distillation for image classifiers on Ray Train and Ray Tune.

Layers, top to bottom (a layer imports only layers below it; only ``cluster`` imports Ray):
cli > cluster > runs > cache > engine | methods > data | models > config > registry > errors | log.
"""
