"""The LM head and its loss, without holding the full-vocabulary float32 logits.

`causal_lm_loss(logits, labels)` is the plain form: Hugging Face's next-token cross-entropy on
float32 logits. Autograd keeps its float32 log-softmax for the backward pass, a [tokens, vocab]
tensor (256 x 49,152 x 4 B = 48 MiB per 256-token sequence at SmolLM2's vocabulary, 1.2 GiB for
2,048 tokens at Qwen2.5-3B's): by far the largest thing a training step saves.

`head_loss(hidden, lm_head, labels)` computes the same value from the (normed) hidden states,
chunk by chunk over the tokens: each chunk's logits are computed, upcast, reduced to its
log-sum-exp and target logit, and, when a gradient is needed, turned straight into that chunk's
gradient with respect to the hidden states ((softmax - onehot) / n) @ W. Only that [tokens, hidden]
gradient is kept for the backward pass, which then just scales it: no logits are recomputed, so
the LM head costs the same two matmuls as the plain form. Under autocast every product runs in
the same precision as the plain form's (the chunk's logits are the lm_head's own output, upcast).

`distill_loss` is the KL to a teacher's next-token distribution (distillation from the full model),
chunked the same way. `stored_distill_loss` is the same objective against the teacher's top-K predictions
stored beside the token shards (`targets.py`): no teacher runs, and the cross-entropy and the KL come
from one pass over the logits, so the head costs what the plain loss's does.

The two chunked autograd functions live in `ops.py` (`ops.chunked_head_loss`, `ops.chunked_kl`),
each beside its full-logits reference; `ops.reference()` switches them (and the other fused ops) off.

`OuroborosOutput.logits` (model.py) is computed on first access (`lazy_logits`), in the grad and autocast
mode of the forward that produced it: a training step that reads only `.loss` never materialises
the [batch, seq, vocab] logits at all.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .ops import (IGNORE, chunked_head_loss, chunked_kl, chunked_token_losses, chunked_topk_distill, kl_sum,
                  topk_distill)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored against labels[t + 1] (Hugging Face's convention); the last gets -100."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy with Hugging Face's convention: `labels` are aligned with the
    inputs, position t is scored against labels[t+1], -100 is ignored. The mean over scored
    tokens, their sum (reduction="sum", as evaluation accumulates it) or each one ("none")."""
    target = shift_labels(labels.to(logits.device)).reshape(-1)
    return F.cross_entropy(logits.float().flatten(0, -2), target, ignore_index=IGNORE, reduction=reduction)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] next-token cross-entropy of each position (0 where nothing is scored)."""
    return causal_lm_loss(logits, labels, reduction="none").view(labels.shape)


def scored_tokens(labels: torch.Tensor) -> int:
    """How many positions `causal_lm_loss` scores for these labels."""
    return int((shift_labels(labels) != IGNORE).sum())


def default_chunk(vocab_size: int) -> int:
    """Tokens per chunk: about 8M float32 logits (32 MiB) per chunk, at least 128 tokens."""
    return max(128, (1 << 23) // max(vocab_size, 1))


def head_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`causal_lm_loss(lm_head(hidden), labels)` without the full logits (see the module's doc).

    hidden: [..., T, H] final (normed) hidden states; labels: [..., T] aligned with the inputs.
    Falls back to the plain form when the LM head itself is trained (its weight gradient would
    need the logits' gradient for every token).
    """
    weight, bias = lm_head.weight, lm_head.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return causal_lm_loss(lm_head(hidden), labels)
    targets = shift_labels(labels.to(hidden.device)).reshape(-1)
    return chunked_head_loss(hidden.flatten(0, -2), weight, bias, targets, chunk or default_chunk(weight.shape[0]))


def head_token_losses(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`token_losses(lm_head(hidden), labels)` [..., T] without the full logits, chunked as `head_loss`
    (and, like it, the plain form when the LM head itself is trained)."""
    weight, bias = lm_head.weight, lm_head.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return token_losses(lm_head(hidden), labels)
    targets = shift_labels(labels.to(hidden.device)).reshape(-1)
    flat = chunked_token_losses(hidden.flatten(0, -2), weight, bias, targets, chunk or default_chunk(weight.shape[0]))
    return flat.view(labels.shape)


@dataclass
class Teacher:
    """Distillation targets for one batch: the teacher's final (normed) hidden states [B, T, H], the
    function turning them into logits (its LM head), and the weights of the two terms of the loss
    `ce_weight * next-token CE + weight * KL(teacher || student)`."""

    hidden: torch.Tensor
    logits: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0
    ce_weight: float = 1.0
    lm_head: nn.Linear | None = None  # when `logits` is this plain linear head (the fused path below)


@dataclass
class StoredTeacher:
    """Distillation targets for one batch read from disk: the teacher's top-K next-token ids [B, T, K] and
    their log-probabilities with, last, the log of its remaining mass [B, T, K + 1] (`targets.py`), and
    the weights of `ce_weight * next-token CE + weight * KL(teacher || student)`, the KL over the K + 1
    buckets (`ops.topk_kl_terms`)."""

    ids: torch.Tensor
    logp: torch.Tensor
    weight: float = 1.0
    ce_weight: float = 1.0


def stored_distill_loss(hidden: torch.Tensor, lm_head: nn.Linear | None, labels: torch.Tensor, st: StoredTeacher,
                        chunk: int, logits: torch.Tensor | None = None):
    """(loss, CE, KL) against stored targets, over the positions the next-token loss scores: from the
    normed hidden states through a plain frozen `lm_head` chunk by chunk (`ops.chunked_topk_distill`),
    or from full `logits` (heads that scale or soft-cap them)."""
    targets = shift_labels(labels.to(hidden.device)).reshape(-1)
    ids = st.ids.to(hidden.device).reshape(targets.shape[0], -1)
    logp = st.logp.to(hidden.device).reshape(targets.shape[0], -1)
    if logits is not None:
        return topk_distill(logits.flatten(0, -2), targets, ids, logp, st.ce_weight, st.weight)
    return chunked_topk_distill(hidden.flatten(0, -2), lm_head.weight, lm_head.bias, targets, ids, logp,
                                st.ce_weight, st.weight, chunk)


def kl_chunk(h, t, valid, student_logits, teacher_logits) -> torch.Tensor:
    """Sum over the chunk's scored positions of KL(softmax(teacher) || softmax(student)), in float32."""
    with torch.no_grad():
        t_logits = teacher_logits(t)
    return kl_sum(student_logits(h), t_logits, valid)


def distill_loss(hidden: torch.Tensor, student_logits, teacher: Teacher, labels: torch.Tensor,
                 chunk: int, lm_head: nn.Linear | None = None) -> torch.Tensor:
    """Mean over the positions the next-token loss scores of KL(p_teacher || p_student) (temperature 1).

    Chunk by chunk over the tokens: a chunk's [chunk, vocab] float32 tensors exist only while it is
    computed, never the whole sequence's. When both heads are plain frozen linear layers (`lm_head`,
    `teacher.lm_head`) the gradient is formed in the same pass (`ops.chunked_kl`); otherwise (heads that
    scale or soft-cap their logits) each chunk is checkpointed and recomputed for its gradient."""
    valid = (shift_labels(labels.to(hidden.device)) != IGNORE).reshape(-1)
    h, t = hidden.flatten(0, -2), teacher.hidden.to(hidden.device).flatten(0, -2)
    grad = torch.is_grad_enabled() and h.requires_grad
    if lm_head is not None and teacher.lm_head is not None and not lm_head.weight.requires_grad:
        th = teacher.lm_head
        return chunked_kl(h, lm_head.weight, lm_head.bias, t.to(th.weight.device), th.weight, th.bias, valid, chunk)
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        args = (h[i : i + chunk], t[i : i + chunk], valid[i : i + chunk], student_logits, teacher.logits)
        total = total + (checkpoint(kl_chunk, *args, use_reentrant=False) if grad else kl_chunk(*args))
    return total / valid.sum().clamp(min=1)


def lazy_logits(hidden: torch.Tensor, lm_head: nn.Module) -> Callable[[], torch.Tensor]:
    """A function computing lm_head(hidden) later, in the grad and autocast mode of now."""
    grad = torch.is_grad_enabled()
    dev = hidden.device.type
    amp = torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)
    amp_dtype = torch.get_autocast_dtype(dev) if amp else None

    def compute() -> torch.Tensor:
        ctx = torch.autocast(dev, dtype=amp_dtype) if amp else torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), ctx:
            return lm_head(hidden)

    return compute


def step_objective(tc, final: torch.Tensor, step_losses: torch.Tensor | None, labels) -> torch.Tensor:
    """What per-step supervision adds to the final loss `final`: step_loss_weight x the mean of the
    read-out steps' losses, and monotonic_weight x the sum of relu(L_later - L_earlier) along the
    read-out steps and the final step (step_losses: [k, B, T] per position, 0 where unscored)."""
    if step_losses is None:
        return final.new_zeros(())
    means = step_losses.sum(dim=(1, 2)) / max(1, scored_tokens(labels))
    extra = tc.step_loss_weight * means.mean()
    if tc.monotonic_weight:
        chain = torch.cat([means, final.reshape(1)])
        extra = extra + tc.monotonic_weight * torch.relu(chain[1:] - chain[:-1]).sum()
    return extra
