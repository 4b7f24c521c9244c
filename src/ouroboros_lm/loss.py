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
chunked the same way.

`OuroborosOutput.logits` is computed on first access (`lazy_logits`), in the grad and autocast
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

IGNORE = -100


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


class _SavedGradient(torch.autograd.Function):
    """A loss whose forward also computes its gradient with respect to its first input (the hidden
    states) and saves only that: the backward just scales it by the incoming gradient."""

    @staticmethod
    def finish(ctx, loss: torch.Tensor, grad: torch.Tensor | None, n_inputs: int) -> torch.Tensor:
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.n_inputs = n_inputs
        return loss

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        go = go.reshape(go.shape + (1,) * (grad.dim() - go.dim()))  # a scalar loss, or one loss per token
        return ((grad.float() * go).to(grad.dtype),) + (None,) * (ctx.n_inputs - 1)


class _ChunkedHeadLoss(_SavedGradient):
    """sum over tokens of CE(hidden @ W^T + b, target) / n_valid, in chunks of `chunk` tokens.

    With `need_grad`, the forward also computes d loss / d hidden and saves only that."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, need_grad):
        N = hidden.shape[0]
        valid = targets != IGNORE
        n_valid = valid.sum()
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if need_grad else None
        w_mm = None
        for i in range(0, N, chunk):
            h, t, v = hidden[i : i + chunk], targets[i : i + chunk], valid[i : i + chunk]
            logits = F.linear(h, weight, bias)  # as the plain form: under autocast, in its dtype
            lf = logits.float()
            lse = torch.logsumexp(lf, dim=-1)
            tl = lf.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total = total + torch.where(v, lse - tl, 0.0).sum()
            if need_grad:
                if w_mm is None:
                    w_mm = weight.to(logits.dtype)  # the weight the forward product used (autocast's cast)
                p = torch.exp(lf.sub_(lse.unsqueeze(-1)))  # softmax, in place of the upcast logits
                p.scatter_add_(-1, t.clamp(min=0).unsqueeze(-1), -torch.ones_like(tl).unsqueeze(-1))
                p.mul_(v.unsqueeze(-1) / n_valid)
                grad[i : i + chunk] = (p.to(logits.dtype) @ w_mm).to(hidden.dtype)
        return _SavedGradient.finish(ctx, total / n_valid, grad, n_inputs=6)


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
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _ChunkedHeadLoss.apply(hidden.flatten(0, -2), weight, bias, targets, chunk or default_chunk(weight.shape[0]), need_grad)


class _ChunkedTokenLosses(_SavedGradient):
    """CE(hidden @ W^T + b, target) of each token [N] (0 where the target is ignored), in chunks of
    `chunk` tokens; with `need_grad` the forward also computes each token's d loss_t / d hidden_t
    ((softmax - onehot) @ W: a token's loss depends on its own hidden state only) and saves only that,
    so a per-token loss costs what the mean one does (`_ChunkedHeadLoss`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, need_grad):
        losses = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)
        grad = torch.empty_like(hidden) if need_grad else None
        for i in range(0, hidden.shape[0], chunk):
            part = slice(i, i + chunk)
            logits = F.linear(hidden[part], weight, bias)  # under autocast, in its dtype (as the plain form)
            scores = logits.float()
            losses[part] = F.cross_entropy(scores, targets[part], ignore_index=IGNORE, reduction="none")
            if need_grad:
                scored = (targets[part] != IGNORE).unsqueeze(-1)
                p = scores.softmax(-1)
                p.scatter_add_(-1, targets[part].clamp(min=0).unsqueeze(-1), -torch.ones_like(p[:, :1]))
                p.mul_(scored)
                grad[part] = (p.to(logits.dtype) @ weight.to(logits.dtype)).to(hidden.dtype)
        return _SavedGradient.finish(ctx, losses, grad, n_inputs=6)


def head_token_losses(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """`token_losses(lm_head(hidden), labels)` [..., T] without the full logits, chunked as `head_loss`
    (and, like it, the plain form when the LM head itself is trained)."""
    weight, bias = lm_head.weight, lm_head.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return token_losses(lm_head(hidden), labels)
    targets = shift_labels(labels.to(hidden.device)).reshape(-1)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    flat = _ChunkedTokenLosses.apply(hidden.flatten(0, -2), weight, bias, targets,
                                     chunk or default_chunk(weight.shape[0]), need_grad)
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


class _ChunkedKL(_SavedGradient):
    """sum over the valid positions of KL(softmax(t Wt^T + bt) || softmax(h W^T + b)) / n_valid, chunk by
    chunk; with `need_grad` the forward also computes d/dh = ((softmax_s - softmax_t) / n) @ W and saves
    only that, so each chunk costs three head products and none is recomputed in the backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, t_weight, t_bias, valid, chunk, need_grad):
        n_valid = valid.sum().clamp(min=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if need_grad else None
        for i in range(0, hidden.shape[0], chunk):
            h, v = hidden[i : i + chunk], valid[i : i + chunk]
            logits = F.linear(h, weight, bias)
            ls = F.log_softmax(logits.float(), dim=-1)
            lt = F.log_softmax(F.linear(teacher[i : i + chunk], t_weight, t_bias).float(), dim=-1)
            pt = lt.exp()
            total = total + torch.where(v, (pt * (lt - ls)).sum(-1), 0.0).sum()
            if need_grad:
                g = ls.exp_().sub_(pt).mul_(v.unsqueeze(-1) / n_valid)  # softmax_s - softmax_t, in place
                grad[i : i + chunk] = (g.to(logits.dtype) @ weight.to(logits.dtype)).to(hidden.dtype)
        return _SavedGradient.finish(ctx, total / n_valid, grad, n_inputs=9)


def kl_chunk(h, t, valid, student_logits, teacher_logits) -> torch.Tensor:
    """Sum over the chunk's scored positions of KL(softmax(teacher) || softmax(student)), in float32."""
    s = F.log_softmax(student_logits(h).float(), dim=-1)
    with torch.no_grad():
        lt = F.log_softmax(teacher_logits(t).float(), dim=-1)
    return torch.where(valid, (lt.exp() * (lt - s)).sum(-1), 0.0).sum()


def distill_loss(hidden: torch.Tensor, student_logits, teacher: Teacher, labels: torch.Tensor,
                 chunk: int, lm_head: nn.Linear | None = None) -> torch.Tensor:
    """Mean over the positions the next-token loss scores of KL(p_teacher || p_student) (temperature 1).

    Chunk by chunk over the tokens: a chunk's [chunk, vocab] float32 tensors exist only while it is
    computed, never the whole sequence's. When both heads are plain frozen linear layers (`lm_head`,
    `teacher.lm_head`) the gradient is formed in the same pass (`_ChunkedKL`); otherwise (heads that
    scale or soft-cap their logits) each chunk is checkpointed and recomputed for its gradient."""
    valid = (shift_labels(labels.to(hidden.device)) != IGNORE).reshape(-1)
    h, t = hidden.flatten(0, -2), teacher.hidden.to(hidden.device).flatten(0, -2)
    grad = torch.is_grad_enabled() and h.requires_grad
    if lm_head is not None and teacher.lm_head is not None and not lm_head.weight.requires_grad:
        th = teacher.lm_head
        return _ChunkedKL.apply(h, lm_head.weight, lm_head.bias, t.to(th.weight.device), th.weight, th.bias,
                                valid, chunk, grad)
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


@dataclass(init=False, eq=False)
class OuroborosOutput:
    """loss (None without labels), logits [batch, seq, vocab]; under adaptive exit, steps [B, T]
    (the recurrence steps each position ran); with `readout_steps` (K steps), step_losses [K, B, T]
    (each position's next-token loss had the recursion stopped after each of those steps, 0 where
    nothing is scored) and, for a model with a halter, step_halts [K, B, T] (its stop probability
    there).

    `logits` may be given as a tensor or as a function computing it (`lazy_logits`); then it is
    computed on first access and kept. (The logits are not a dataclass field, so that code walking
    the fields for tensors, e.g. DDP's find_unused_parameters, sees the loss and does not compute
    the logits.)"""

    loss: torch.Tensor | None
    steps: torch.Tensor | None
    step_losses: torch.Tensor | None
    step_halts: torch.Tensor | None
    ce_loss: torch.Tensor | None  # under distillation: the two terms of `loss` (detached)
    kl_loss: torch.Tensor | None

    def __init__(self, loss: torch.Tensor | None, logits, steps=None, step_losses=None, step_halts=None):
        self.loss, self.steps, self.step_losses, self.step_halts = loss, steps, step_losses, step_halts
        self.ce_loss = self.kl_loss = None
        self.logits_or_thunk = logits

    @property
    def logits(self) -> torch.Tensor:
        if callable(self.logits_or_thunk) and not torch.is_tensor(self.logits_or_thunk):
            self.logits_or_thunk = self.logits_or_thunk()
        return self.logits_or_thunk
