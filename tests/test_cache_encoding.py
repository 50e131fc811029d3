"""Lossy teacher-cache encodings against the losses they feed: the measured error per method and
the driver's one-line refusal of an encoding a method's loss cannot bear."""
import numpy as np
import pytest
import torch

from kd_ray.cache import rows
from kd_ray.cache.fidelity import TOLERANCE, check_encoding, confident_teacher, encoding_error, loss_error
from kd_ray.config import DistillConfig, load_config
from kd_ray.errors import ConfigError
from kd_ray.methods import build_method

METHODS = [("kd", {}), ("kd", {"standardize": True}), ("mse_logits", {}), ("dkd", {}), ("dist", {})]


def test_the_error_is_the_relative_change_of_the_loss_computed_by_hand():
    teacher = confident_teacher(1000)
    served = rows.roundtrip(teacher, "topk", 32)
    method = build_method(DistillConfig(loss="kd", temperature=4.0, alpha=1.0))
    noise = np.random.default_rng(1).standard_normal(teacher.shape).astype(np.float32)
    by_hand = 0.0
    for s in (noise, 0.5 * teacher + 2 * noise):
        def kd(t):
            p = torch.softmax(torch.from_numpy(t) / 4, 1)
            log_q = torch.log_softmax(torch.from_numpy(s) / 4, 1)
            return float((p * (p.log() - log_q)).sum(1).mean() * 16)
        by_hand = max(by_hand, abs(kd(served) - kd(teacher)) / kd(teacher))
    assert loss_error(method, teacher, served) == pytest.approx(by_hand, rel=1e-3)
    assert by_hand > 0.1  # top-32 at T 4 spreads the tail evenly: far off


@pytest.mark.parametrize("name, params", METHODS)
@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 8.0])
def test_dense_float16_and_int8_stay_within_the_tolerance(name, params, temp):
    cfg = DistillConfig(loss=name, temperature=temp, params=params)
    assert encoding_error(cfg, "float16", None, 1000) < 1e-3
    assert encoding_error(cfg, "int8", None, 1000) < TOLERANCE


def check(*overrides, classes=1000):
    check_encoding(load_config(overrides=list(overrides)), classes)


def test_a_top_k_cache_is_refused_for_a_loss_it_moves_too_far():
    with pytest.raises(ConfigError) as err:
        check("distill.loss=kd", "distill.temperature=4", "distill.cache_encoding=topk")
    message = str(err.value)
    assert "\n" not in message
    assert "distill.cache_encoding=top-32 changes distill.loss=kd's loss by" in message
    assert "use distill.cache_encoding=float16" in message
    percent = float(message.split("loss by ")[1].split("%")[0])
    assert percent > 100 * TOLERANCE
    with pytest.raises(ConfigError, match="distill.loss=mse_logits"):
        check("distill.loss=mse_logits", "distill.cache_top_k=32")
    with pytest.raises(ConfigError, match="distill.loss=dist"):
        check("distill.loss=dist", "distill.temperature=1", "distill.cache_encoding=topk")


def test_encodings_a_loss_can_bear_pass():
    check("distill.loss=kd", "distill.temperature=4")  # the default: dense float16
    check("distill.loss=dkd", "distill.temperature=4", "distill.cache_encoding=int8")
    check("distill.loss=kd", "distill.temperature=1", "distill.cache_encoding=topk")  # exact at T 1
    check("distill.loss=kd", "distill.cache_encoding=topk", "distill.cache_top_k=1000")  # k >= classes: dense


def test_int8_rows_are_about_a_kilobyte_at_1000_classes(tmp_path):
    teacher = confident_teacher(1000, rows=4)
    writer = rows.ShardWriter(tmp_path, 0, 4, 1000, None, "int8")
    writer.add(teacher)
    writer.close()
    cache = rows.CachedLogits(tmp_path, 4, 1, 1000, [0, 4])
    assert cache.nbytes_per_row() == 1008
    step = (teacher.max(1) - teacher.min(1)) / 255
    assert all(float((cache.row(i, 0) - torch.from_numpy(teacher[i])).abs().max()) <= step[i] / 2 + 1e-5
               for i in range(4))


def test_cache_encoding_settings_are_checked():
    with pytest.raises(ConfigError, match="float16, int8 or topk"):
        load_config(overrides=["distill.cache_encoding=bf16"])
    with pytest.raises(ConfigError, match="cache_top_k applies to distill.cache_encoding=topk"):
        load_config(overrides=["distill.cache_encoding=int8", "distill.cache_top_k=8"])
