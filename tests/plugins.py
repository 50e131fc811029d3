"""Loss plugins used by the tests (loaded as "tests.plugins:my_loss")."""
import torch


def my_loss(student_logits, teacher_logits, labels, cfg):
    """Squared distance between logits (a toy custom distillation loss)."""
    diff = (student_logits - teacher_logits.detach()).pow(2).mean()
    return {"loss": diff, "sq": diff.detach()}


def no_teacher_loss(student_logits, teacher_logits, labels, cfg):
    return {"loss": student_logits.sum() * 0}


no_teacher_loss.needs_teacher = False

not_callable = 3
