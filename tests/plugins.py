"""Loss plugins used by the tests (loaded as "tests.plugins:my_loss")."""
import torch.nn.functional as F


def my_loss(student_logits, teacher_logits, labels, cfg):
    """Squared distance between logits (a toy custom distillation loss)."""
    diff = (student_logits - teacher_logits.detach()).pow(2).mean()
    return {"loss": diff, "sq": diff.detach()}


def no_teacher_loss(student_logits, teacher_logits, labels, cfg):
    return {"loss": student_logits.sum() * 0}


no_teacher_loss.needs_teacher = False

not_callable = 3


_calls = {"n": 0}


def nan_in_second_epoch(student_logits, teacher_logits, labels, cfg):
    """Cross-entropy for 4 steps (one epoch in the Ray test), then NaN: a diverging run."""
    _calls["n"] += 1
    loss = F.cross_entropy(student_logits, labels)
    if _calls["n"] > 4:
        loss = loss * float("nan")
    return {"loss": loss}


nan_in_second_epoch.needs_teacher = False
