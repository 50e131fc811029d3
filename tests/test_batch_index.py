"""Batches that carry each image's training-set position, for a method that ``needs_index`` (crd's
memory bank): the loader, the epoch loop and TrainStep pass it on; other methods never see it."""
import torch
from torch.utils.data import DataLoader, TensorDataset

from kd_ray.config import DataConfig
from kd_ray.data import build_data
from kd_ray.data.views import Indexed, ReplayViews
from kd_ray.engine import make_loaders, train_one_epoch
from kd_ray.methods import Distiller, TrainStep, setup_method
from kd_ray.methods.logits import cross_entropy

CPU = torch.device("cpu")


class Recorder(Distiller):
    """CE, recording the positions it is given (and its setup's train_size)."""

    teacher = None
    needs_index = True

    def __init__(self):
        super().__init__(None)
        self.seen, self.train_size = [], None

    def setup(self, student, teacher, sample, train_size=None):
        self.train_size = train_size

    def forward(self, student, teacher, labels, epoch, index=None):
        self.seen.append(index)
        ce = cross_entropy(student.logits, labels)
        return {"loss": ce}


class Plain(Distiller):
    teacher = None

    def setup(self, student, teacher, sample):  # the old signature: no train_size
        self.called = True

    def forward(self, student, teacher, labels, epoch):  # no index keyword
        return {"loss": cross_entropy(student.logits, labels)}


def test_indexed_items_end_with_their_position_also_for_replayed_views():
    base = TensorDataset(torch.arange(5.0)[:, None], torch.zeros(5, dtype=torch.long))
    assert Indexed(base)[3][2] == {"index": 3} and len(Indexed(base)) == 5
    views = ReplayViews(base, views=3, seed=0)
    image, label, sample, view, extra = Indexed(views)[2 * 5 + 4]  # flat id: view 2 of sample 4
    assert (sample, view) == (4, 2) and extra == {"index": 4}


def test_the_loader_the_loop_and_the_step_pass_positions_to_the_method():
    bundle = build_data(DataConfig(name="synthetic", synthetic_size=24, image_size=8), "distill", 0)
    train, _, _ = make_loaders(bundle, 8, 0, 1, 0, 0, with_index=True)
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, len(bundle.classes)))
    method = Recorder()
    setup_method(method, student, None, bundle.val[0][0][None], len(bundle.train))
    assert method.train_size == 24
    step = TrainStep(student, method)
    train_one_epoch(step, train, torch.optim.SGD(step.parameters(), lr=0.1), epoch=1, device=CPU)
    seen = torch.cat(method.seen)
    assert seen.dtype == torch.long and sorted(seen.tolist()) == list(range(24))  # each image once
    images = torch.stack([bundle.train[i][0] for i in seen[:8].tolist()])  # the positions are the images'
    first = next(iter(train))
    assert torch.equal(first[0], images) and torch.equal(first[2]["index"], seen[:8])


def test_a_method_without_needs_index_keeps_its_signatures():
    student = torch.nn.Linear(4, 3)
    method = Plain(None)
    setup_method(method, student, None, torch.zeros(1, 4), 10)
    assert method.called
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long)), batch_size=4)
    sums = train_one_epoch(TrainStep(student, method), data, torch.optim.SGD(student.parameters(), lr=0.1),
                           epoch=1, device=CPU)
    assert sums["images"] == 8
