"""Knowledge distillation in the trainer (DeiT, Touvron et al. 2021): a frozen teacher and the hard and
soft distillation losses, plus the evaluation of a distilled student's two heads.

    distiller = build_distiller(cfg, student, device, dtype)   # None when distill.kind is "none"
    loss = distiller.loss(images, student(images), labels)

With z_cls / z_dist the student's class-token / distillation-token logits (a student without a
distillation head uses z_cls for both: classic logit distillation), z_t the teacher's, y the labels,
alpha = distill.alpha and tau = distill.tau:

    hard: (1 - alpha) * CE(z_cls, y) + alpha * CE(z_dist, argmax z_t)
    soft: (1 - alpha) * CE(z_cls, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_dist / tau))

CE on the labels uses optim.label_smoothing; CE on the teacher's labels does not (as DeiT). KL is summed
over classes and averaged over the batch, the paper's formula (DeiT's code divides by batch x classes).

The teacher is built from the registry with the student's classes and input size, loaded strict from
its weights file, put in eval mode with every parameter frozen, cast to the student's precision and
kept outside DeepSpeed (never wrapped or sharded by ZeRO): each rank runs it on its own micro-batch.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from distvit import models
from distvit.config import Config, ConfigError
from distvit.engine.loss import distillation_loss  # the pure loss; tests import it from here too

HEAD_SUFFIXES = ("", "_cls", "_dist")  # averaged (the model's prediction), class token, distillation token


def split_heads(output) -> tuple[torch.Tensor, torch.Tensor]:
    """(class logits, distillation logits) from a student's output: a (cls, dist) pair or one tensor for both."""
    if isinstance(output, (tuple, list)):
        cls_logits, dist_logits = output
        return cls_logits, dist_logits
    return output, output


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Metric suffixes evaluate() reports: the averaged, class-token and distillation-token heads of a
    distilled student; the one head of any other model."""
    return HEAD_SUFFIXES if hasattr(model, "set_separate_heads") else ("",)


def named_logits(output) -> dict[str, torch.Tensor]:
    """{"": logits} for one head; {"": average, "_cls": class head, "_dist": distillation head} for two, float32."""
    if isinstance(output, (tuple, list)):
        cls_logits, dist_logits = (t.float() for t in output)
        return {"": (cls_logits + dist_logits) / 2, "_cls": cls_logits, "_dist": dist_logits}
    return {"": output.float()}


@contextmanager
def separate_heads(model: nn.Module):
    """Inside the block a distilled student returns (class logits, distillation logits) even in eval mode."""
    if not hasattr(model, "set_separate_heads"):
        yield
        return
    before = model.separate_heads
    model.set_separate_heads(True)
    try:
        yield
    finally:
        model.set_separate_heads(before)


def build_teacher(name: str, checkpoint: str, *, num_classes: int, img_size, in_chans: int,
                  device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The registered model `name` with `checkpoint` loaded strict, frozen, in eval mode, on device in dtype."""
    try:
        teacher = models.create(name, checkpoint=checkpoint, num_classes=num_classes, img_size=img_size,
                                in_chans=in_chans, reset_head=False)  # a teacher's head is never re-initialised
    except FileNotFoundError as e:
        raise ConfigError(f"distill.teacher_checkpoint={checkpoint!r}: the file does not exist; train the teacher "
                          "first (its run folder's model.safetensors) or point distill.teacher_checkpoint at its "
                          "weights") from e
    except models.WeightsMismatchError as e:
        raise ConfigError(f"distill.teacher_checkpoint={checkpoint!r} does not fit distill.teacher={name!r} built for "
                          f"{num_classes} classes, img_size {img_size}, in_chans {in_chans}: {e.report.describe()}; "
                          "give the model name the weights were trained as") from e
    except ValueError as e:
        if not models.is_model(name):
            raise ConfigError(f"distill.teacher={name!r}: {e}") from e
        raise
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher.to(device=device, dtype=dtype)


class Distiller:
    """A frozen teacher and the loss that compares the student with it."""

    def __init__(self, teacher: nn.Module, *, kind: str, alpha: float, tau: float, label_smoothing: float = 0.0,
                 teacher_name: str = ""):
        self.teacher = teacher
        self.kind, self.alpha, self.tau, self.label_smoothing = kind, alpha, tau, label_smoothing
        self.teacher_name = teacher_name or type(teacher).__name__

    @torch.no_grad()
    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.teacher.eval()  # stays in eval mode even if a caller flips train() on everything
        return self.teacher(images).float()

    def loss(self, images: torch.Tensor, student_output, labels: torch.Tensor) -> torch.Tensor:
        cls_logits, dist_logits = split_heads(student_output)
        return distillation_loss(cls_logits, dist_logits, self.teacher_logits(images), labels, kind=self.kind,
                                 alpha=self.alpha, tau=self.tau, label_smoothing=self.label_smoothing)

    def describe(self) -> str:
        params = sum(p.numel() for p in self.teacher.parameters())
        return (f"distillation: {self.kind} from teacher {self.teacher_name} ({params / 1e6:.2f}M params, frozen, "
                f"outside DeepSpeed), alpha={self.alpha}, tau={self.tau}")


def build_distiller(cfg: Config, student: nn.Module, device: torch.device, dtype: torch.dtype) -> Distiller | None:
    """The run's Distiller (None for distill.kind=none); switches a distilled student to return both heads."""
    d = cfg.distill
    if d.kind == "none":
        return None
    if hasattr(student, "set_distilled_training"):
        student.set_distilled_training(True)
    teacher = build_teacher(d.teacher, d.teacher_checkpoint, num_classes=student.num_classes,
                            img_size=cfg.model.img_size or cfg.data.img_size,
                            in_chans=cfg.model.in_chans or cfg.data.in_chans, device=device, dtype=dtype)
    return Distiller(teacher, kind=d.kind, alpha=d.alpha, tau=d.tau, label_smoothing=cfg.optim.label_smoothing,
                     teacher_name=d.teacher)
