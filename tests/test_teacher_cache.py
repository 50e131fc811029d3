"""Teacher-logit cache without Ray: built in-process, compared with the live teacher."""
import json

import pytest
import torch
from torch.utils.data import DataLoader

from kd_ray import cache as teacher_cache
from kd_ray.config import load_config
from kd_ray.data import build_data
from kd_ray.data.views import CachedViews, ReplayViews, ViewSampler
from kd_ray.engine import train_one_epoch
from kd_ray.errors import ConfigError
from kd_ray.methods import TrainStep, build_method
from kd_ray.models import build_model, export_teacher, load_teacher


def setup(tmp_path, *extra, seed=0):
    """A synthetic 10-class set and a (random) teacher file for it."""
    torch.manual_seed(seed)
    teacher_file = tmp_path / f"teacher{seed}.pt"
    export_teacher(teacher_file, build_model("simple_cnn", 10), "simple_cnn",
                   [f"class{c}" for c in range(10)], 16)
    return load_config(overrides=[
        "data.name=synthetic", "data.synthetic_size=40", "data.image_size=16",
        f"distill.teacher_path={teacher_file}", "distill.cache_views=3", "distill.cache_batch_size=16",
        "run.num_workers=2", f"run.storage={tmp_path / 'results'}", *extra])


def cached_loader(cfg, path, epoch=0, batch_size=8):
    data = build_data(cfg.data, "distill", cfg.run.seed)
    views = CachedViews(data.train, teacher_cache.load(path), cfg.data.split_seed)
    sampler = ViewSampler(views, views.views, views.seed, num_replicas=1, rank=0, seed=0)
    sampler.set_epoch(epoch)
    return DataLoader(views, batch_size=batch_size, sampler=sampler), views


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("loss", ["kd", "mse_logits"])
def test_cached_and_live_teacher_give_the_same_loss_per_batch(tmp_path, loss, augment):
    cfg = setup(tmp_path, f"data.augment={augment}", f"distill.loss={loss}", "distill.temperature=3")
    path = tmp_path / "cache"
    teacher_cache.build(cfg, path)
    teacher, _ = load_teacher(cfg.distill.teacher_path)
    student = build_model("tiny_cnn", 10).eval()
    method = build_method(cfg.distill)
    for epoch in range(2):
        loader, _ = cached_loader(cfg, path, epoch)
        for images, labels, cached in loader:
            with torch.no_grad():
                live = teacher(images)  # the teacher on the replayed view itself
                s = student(images)
                a = method.loss(s, live, labels)["loss"]
                b = method.loss(s, cached, labels)["loss"]
            assert cached.dtype == torch.float16
            assert torch.allclose(cached.float(), live, rtol=2e-3, atol=2e-3)  # float16 rounding
            assert torch.allclose(a, b, rtol=2e-3, atol=1e-4), (a, b)


def test_views_replay_exactly_and_differ_from_each_other(tmp_path):
    cfg = setup(tmp_path, "data.augment=true")
    replay = ReplayViews(build_data(cfg.data, "distill", 0).train, 3, seed=0)
    n = len(replay)
    first, again = replay[5][0], replay[5][0]
    torch.manual_seed(123)  # the caller's RNG state plays no part
    assert torch.equal(first, replay[5][0]) and torch.equal(first, again)
    assert not torch.equal(first, replay[n + 5][0])  # view 1 of the same image
    assert replay[n + 5][2:] == (5, 1)


def test_sampler_walks_through_every_view_once_per_k_epochs(tmp_path):
    cfg = setup(tmp_path, "data.augment=true")
    loader, views = cached_loader(cfg, _built(cfg, tmp_path), epoch=0)
    n = len(views)
    sampler = loader.sampler
    seen = {i: set() for i in range(n)}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for flat in sampler:
            seen[flat % n].add(flat // n)
    assert all(v == {0, 1, 2} for v in seen.values())


def _built(cfg, tmp_path, name="cache"):
    path = tmp_path / name
    teacher_cache.build(cfg, path)
    return path


def test_teacher_runs_samples_times_views_not_per_epoch(tmp_path):
    cfg = setup(tmp_path, "data.augment=true")
    path = _built(cfg, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["teacher_forwards"] == manifest["rows"] == 40 * 3
    teacher, _ = load_teacher(cfg.distill.teacher_path)
    calls = []
    teacher.register_forward_pre_hook(lambda _m, args: calls.append(len(args[0])))
    student = build_model("tiny_cnn", 10)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    step = TrainStep(student, build_method(cfg.distill, "kd"))
    for epoch in range(4):  # the teacher is passed in, but cached logits win
        loader, _ = cached_loader(cfg, path, epoch)
        sums = train_one_epoch(step, loader, opt, epoch=epoch + 1, device=torch.device("cpu"),
                               teacher=teacher)
        assert sums["teacher_images"] == 0 and sums["images"] == 40
    assert calls == []
    live = DataLoader(build_data(cfg.data, "distill", 0).train, batch_size=8)
    sums = train_one_epoch(step, live, opt, epoch=1, device=torch.device("cpu"), teacher=teacher)
    assert sums["teacher_images"] == sum(calls) == 40


def test_top_k_keeps_the_top_probabilities_and_the_rest_mass(tmp_path):
    cfg = setup(tmp_path, "distill.cache_top_k=3")
    loader, _ = cached_loader(cfg, _built(cfg, tmp_path))
    teacher, _ = load_teacher(cfg.distill.teacher_path)
    images, _, cached = next(iter(loader))
    with torch.no_grad():
        live = teacher(images).softmax(1)
    approx = cached.softmax(1)
    top = live.topk(3, dim=1).indices
    assert torch.allclose(approx.gather(1, top), live.gather(1, top), atol=2e-3)
    rest = 1 - live.gather(1, top).sum(1)
    assert torch.allclose(1 - approx.gather(1, top).sum(1), rest, atol=2e-3)


@pytest.mark.parametrize("change, reason", [
    ("teacher", "another teacher file"),
    ("data.augment=true", "another transform"),
    ("data.synthetic_size=44", "another dataset"),
    ("distill.cache_top_k=2", "another distill.cache_top_k"),
])
def test_a_stale_cache_is_refused_or_rebuilt_under_auto(tmp_path, capsys, change, reason):
    cfg = setup(tmp_path)
    path = _built(cfg, tmp_path)
    if change == "teacher":
        changed = setup(tmp_path, seed=1)  # same architecture, other weights, other file
    else:
        changed = cfg.replace(**{change.split(".")[0]: {change.split(".")[1].split("=")[0]:
                                                       json.loads(change.split("=")[1])}})
    with pytest.raises(ConfigError, match=reason):
        teacher_cache.check(path, teacher_cache.wanted(changed))
    with pytest.raises(ConfigError, match="kd-ray cache-teacher"):
        teacher_cache.resolve(changed.replace(distill={"teacher_cache": str(path)}), tmp_path / "x")
    resolved = teacher_cache.resolve(changed, path)  # auto: rebuilt in place
    assert "rebuilding" in capsys.readouterr().out
    teacher_cache.check(resolved.distill.teacher_cache, teacher_cache.wanted(changed))
    assert teacher_cache.resolve(cfg.replace(distill={"teacher_cache": "off"}), path).distill.teacher_cache == "off"


def test_an_unfinished_cache_is_never_used(tmp_path):
    cfg = setup(tmp_path)
    path = _built(cfg, tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="no readable manifest"):
        teacher_cache.resolve(cfg.replace(distill={"teacher_cache": str(path)}), tmp_path / "x")
    part = next(path.glob("part-*.npy"))
    _built(cfg, tmp_path)
    part.unlink()
    with pytest.raises(ConfigError, match="incomplete"):
        teacher_cache.load(path)


def test_losses_without_a_teacher_never_build_a_cache(tmp_path):
    cfg = setup(tmp_path, "distill.loss=ce")
    assert teacher_cache.resolve(cfg, tmp_path / "cache").distill.teacher_cache == "off"
    assert not (tmp_path / "cache").exists()


def test_cli_refuses_a_stale_cache_before_ray_starts(tmp_path, capsys, monkeypatch):
    from kd_ray import cli
    from kd_ray.cluster import cache, session, stage

    cfg = setup(tmp_path)
    path = _built(cfg, tmp_path)
    config = tmp_path / "run.yaml"
    cfg.replace(data={"augment": True}, distill={"teacher_cache": str(path)}).save(config)
    for module in (cache, session, stage):
        monkeypatch.setattr(module, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    assert cli.main(["distill", "-c", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "transform/augmentation settings" in err and "kd-ray cache-teacher" in err


@pytest.mark.parametrize("text", ["off", "'off'", "auto", "/data/cache"])
def test_teacher_cache_setting_from_set(text):
    value = load_config(overrides=[f"distill.teacher_cache={text}"]).distill.teacher_cache
    assert value == text.strip("'")


def test_a_cache_without_a_teacher_is_one_line(tmp_path):
    from kd_ray.cache import resolve
    from kd_ray.config import load_config
    from kd_ray.errors import ConfigError

    cfg = load_config(overrides=["data.name=synthetic", "distill.loss=kd"])
    with pytest.raises(ConfigError, match="needs a teacher: set distill.teacher_path"):
        resolve(cfg, tmp_path / "cache")


@pytest.mark.parametrize("floor, shards", [(1, 4), (50, 3), (1000, 1)])
def test_no_shard_is_cut_smaller_than_the_floor(tmp_path, floor, shards):
    """The cluster asks for a shard per worker but at least cluster.cache.MIN_SHARD_ROWS rows each:
    120 rows (40 x 3 views) on 4 workers."""
    cfg = setup(tmp_path, "data.augment=true")
    manifest = teacher_cache.build(cfg, tmp_path / "cache", workers=4, min_shard_rows=floor)
    assert manifest["shards"] == shards and manifest["rows"] == 120
    assert manifest["bounds"][0] == 0 and manifest["bounds"][-1] == 120
