"""Self-distillation from the unconverted model: the converted student learns to give the original's next-token
(or masked-token) distributions.

Loss = ``lm_weight`` x LM loss + ``weight`` x T^2 x KL(teacher || student), both distributions a softmax over the
vocabulary at temperature T, the KL summed over the vocabulary and averaged over real (non-padding) token
positions. The teacher sees the plain window with its natural contiguous positions; the student sees what
training gives it (PoSE's skipped position ids when ``pose`` is on).

Teachers: with full fine-tuning a frozen copy of the model taken before conversion (eval mode, no gradients, on
the training device). With LoRA no copy: the student's own base weights with PEFT's adapters disabled
(``model.disable_adapter()``) and the original position encoding put back (:func:`hf_posenc.original_positions`).
The loop runs the teacher before the student's forward: a LoRA teacher passes through the student's modules, whose
per-forward state must be the student's when gradient checkpointing recomputes layers in backward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..restore import original_positions

TEACHER_KEYS = ("input_ids", "attention_mask", "token_type_ids")  # no labels, no position_ids: natural positions


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over real positions of KL(softmax(teacher / T) || softmax(student / T)); logits (B, L, V), ``mask``
    (B, L) with 1 / True at real tokens (None: all). Computed in fp32; not scaled by T^2."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="none", log_target=True).sum(-1)  # (B, L)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def teacher_logits(accelerator, student: torch.nn.Module, teacher: torch.nn.Module | None,
                   inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L, V) logits of the unconverted model on ``inputs`` at contiguous positions. ``teacher``: the frozen copy
    (full fine-tuning), or None: ``student`` (the unwrapped PeftModel) with its adapters disabled and its original
    positions restored, in eval mode for this forward."""
    feed = {k: v for k, v in inputs.items() if k in TEACHER_KEYS}
    if teacher is not None:
        with accelerator.autocast():
            return teacher(**feed).logits
    was_training = student.training
    disable = getattr(student, "disable_adapter", None)
    student.eval()  # no dropout in the teacher; restored below
    try:
        with (disable() if disable else contextlib.nullcontext()), original_positions(student), accelerator.autocast():
            return student(**feed).logits
    finally:
        student.train(was_training)


def distill_loss(config, outputs, teacher_out: torch.Tensor, inputs: dict[str, torch.Tensor]):
    """(total loss, LM loss, KL) for one micro-batch; ``config``: the :class:`DistillArgs`."""
    kl = distillation_kl(outputs.logits, teacher_out, config.temperature, inputs.get("attention_mask"))
    lm = outputs.loss
    total = config.lm_weight * lm + config.weight * config.temperature**2 * kl
    return total, lm, kl


__all__ = ["distill_loss", "distillation_kl", "teacher_logits"]
