"""Distillation from the full model: the teacher's targets for a batch.

The full base model (all its layers) is the natural teacher of a model cut from it: the same
tokenizer, vocabulary and head. Its final hidden states are computed once per batch without
gradients; the KL itself is computed chunk by chunk inside our head (`loss.distill_loss`), so
neither model's [tokens, vocab] logits are ever held whole.
"""
from __future__ import annotations

import torch

from .families import OWN_HEAD_TYPES, final_logits
from .loss import Teacher


def check_teacher(teacher, vocab_size: int) -> None:
    """A teacher must be a Hugging Face causal LM over the same vocabulary."""
    head = getattr(teacher, "lm_head", None)
    if head is None or not hasattr(teacher, "model"):
        raise ValueError(f"the teacher must be a Hugging Face causal LM (with .model and .lm_head); got {type(teacher).__name__}")
    if head.weight.shape[0] != vocab_size:
        raise ValueError(f"the teacher's vocabulary ({head.weight.shape[0]}) differs from the model's ({vocab_size})")


@torch.no_grad()
def teacher_targets(teacher, input_ids: torch.Tensor, weight: float, ce_weight: float = 1.0) -> Teacher:
    """The teacher's final (normed) hidden states of `input_ids`, and its head, as a `loss.Teacher`."""
    device = teacher.lm_head.weight.device
    hidden = teacher.model(input_ids.to(device), use_cache=False).last_hidden_state
    config = teacher.config

    def logits(h: torch.Tensor) -> torch.Tensor:
        return final_logits(teacher.lm_head(h.to(device)), config)

    plain = config.model_type not in OWN_HEAD_TYPES  # logits = lm_head(h): the fused KL applies
    return Teacher(hidden, logits, weight, ce_weight, lm_head=teacher.lm_head if plain else None)
