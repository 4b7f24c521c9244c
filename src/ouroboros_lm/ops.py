"""The hand-written autograd functions, each beside the plain computation it stands for, and the one
switch that turns them all off.

Eight operations of the model's maths have a *fused* form, a `torch.autograd.Function` whose backward
pass is written by hand so that the forward keeps less for it (`docs/performance.md`, section 4), and
a *reference* form: the same maths in plain torch ops, differentiated by autograd. The two give the
same values and the same gradients (to rounding; `tests/test_ops.py`):

| entry point | fused form | kept for the backward pass: fused / reference |
|---|---|---|
| `rms_norm(x, weight, eps)` | `_RMSNorm` | x and the [.., 1] rsqrt / also a float32 copy of x and the normalised product |
| `swiglu(g, u)`: silu(g) * u | `_SwiGLU` | g, u / also silu(g) |
| `gate_mix(z, h_new, h_old, dt)` | `_GateMix` | z, h_new, h_old as they are / the states' `dt` copies (new tensors for bf16 states) and g |
| `prefix_mean_rms_norm(h, m, weight, eps)` | `_PrefixMeanRMSNorm` | h and the rsqrt / also the float32 prefix means |
| `chunked_head_loss(hidden, weight, bias, targets, chunk)` | `_ChunkedHeadLoss` | d loss / d hidden / the float32 log-softmax of all the logits |
| `chunked_token_losses(hidden, weight, bias, targets, chunk)` | `_ChunkedTokenLosses` | each token's d loss / d hidden / the float32 log-softmax of all the logits |
| `chunked_kl(hidden, weight, bias, teacher, t_weight, t_bias, valid, chunk)` | `_ChunkedKL` | d KL / d hidden / both heads' float32 log-softmaxes |
| `chunked_topk_distill(hidden, weight, bias, targets, t_ids, t_logp, ce_weight, kl_weight, chunk)` | `_ChunkedTopKDistill` | d (CE + KL to stored top-K) / d hidden / the float32 log-softmax of all the logits |

The losses in their fused form also work through the tokens a chunk at a time (never the whole
[tokens, vocab] float32 logits) and turn each chunk straight into its gradient, so no logits are
recomputed in the backward pass. Their reference form is the full-logits loss.

A fused form runs only where it changes something: when a gradient is needed (the losses: always,
their chunking saves memory in evaluation too), and for the losses only while the head itself is
frozen (their fused forms give the head no gradient). Otherwise the reference form runs, whatever
the switch says.

The switch (one for all eight; by name for some of them):

    OUROBOROS_FUSED=0              environment, read once on import: every op starts in reference form
                                   (1 / 0, true / false, on / off, yes / no; anything else is an error)
    ops.use_fused(False)           reference forms from now on (True: fused again); returns the ops that
                                   were in reference form before
    with ops.reference(): ...      reference forms inside the block, restored after it (also a decorator)
    with ops.reference("swiglu"):  the named ops only (`FUSED_OPS` lists the names)
    with ops.fused(): ...          fused forms inside the block (even under OUROBOROS_FUSED=0)
    with ops.switched(flag): ...   either, by a flag
    ops.is_fused("rms_norm")       the current setting of one op

Set it outside a training step: a checkpointed step recomputes its forward in the backward pass, and
the recomputation must take the path the forward took. `memory.step_activation_bytes` (when "auto"
checkpointing starts) assumes the fused forms' saved bytes.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that is not scored (Hugging Face's convention, F.cross_entropy's default)
FUSED_OPS = ("rms_norm", "swiglu", "gate_mix", "prefix_mean_rms_norm", "chunked_head_loss", "chunked_token_losses",
             "chunked_kl", "chunked_topk_distill")
ENV_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def env_fused(value: str | None) -> bool:
    """What OUROBOROS_FUSED=value asks for (unset or empty: fused)."""
    key = (value or "1").strip().lower()
    if key not in ENV_VALUES:
        raise ValueError(f"OUROBOROS_FUSED={value!r}: expected one of {', '.join(ENV_VALUES)}")
    return ENV_VALUES[key]


# The ops now in reference form: the switch's one piece of state.
_REFERENCE: set[str] = set() if env_fused(os.environ.get("OUROBOROS_FUSED")) else set(FUSED_OPS)


def op_names(names: tuple[str, ...]) -> tuple[str, ...]:
    """The named ops (all of them for none), each checked to be one of `FUSED_OPS`."""
    unknown = [n for n in names if n not in FUSED_OPS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; the ops with a fused form are {', '.join(FUSED_OPS)}")
    return names or FUSED_OPS


def is_fused(name: str) -> bool:
    """Whether op `name` now runs its fused form (where one applies)."""
    return op_names((name,))[0] not in _REFERENCE


def use_fused(flag: bool, *names: str) -> frozenset[str]:
    """Fused (True) or reference (False) forms for the named ops (all of them without names) from now on.
    Returns the set of ops in reference form before the call."""
    before = frozenset(_REFERENCE)
    chosen = op_names(names)
    if flag:
        _REFERENCE.difference_update(chosen)
    else:
        _REFERENCE.update(chosen)
    return before


class switched(contextlib.ContextDecorator):
    """Context manager (or decorator): fused (True) or reference (False) forms of the named ops (all
    without names) inside the block; the setting before it is restored after it. An unknown name fails
    at once, not on entering the block."""

    def __init__(self, flag: bool, *names: str):
        self.flag, self.names = flag, op_names(names)
        self.before: list[frozenset[str]] = []  # a stack: the same object may be entered again inside itself

    def __enter__(self):
        self.before.append(use_fused(self.flag, *self.names))
        return self

    def __exit__(self, *exc):
        _REFERENCE.clear()
        _REFERENCE.update(self.before.pop())
        return False


def reference(*names: str) -> switched:
    """Context manager (or decorator): the named ops (all without names) in reference form inside the block."""
    return switched(False, *names)


def fused(*names: str) -> switched:
    """Context manager (or decorator): the named ops (all without names) in fused form inside the block."""
    return switched(True, *names)


def grad_needed(*xs: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


# ---- RMSNorm ---------------------------------------------------------------------------------

def rms_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x / rms(x) in float32 (Hugging Face's statistics, even for a float64 x), and the [.., 1] rsqrt."""
    h = x.to(torch.float32)
    r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h * r, r


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm exactly as Hugging Face's Llama/Qwen do it: weight * (x / rms(x)).to(x.dtype)."""
    n, _ = rms_normalize(x, eps)
    return weight * n.to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """`rms_norm_reference`, saving only x and the rsqrt; the backward recomputes x * rsqrt."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n, r = rms_normalize(x, eps)
        ctx.save_for_backward(x, weight, r)
        return weight * n.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        x, weight, r = ctx.saved_tensors
        n = x.to(torch.float32) * r
        gx = gw = None
        if ctx.needs_input_grad[1]:
            gw = (gy * n.to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            gn = (gy * weight).to(x.dtype).to(torch.float32)
            gx = (r * (gn - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Hugging Face's Llama/Qwen (float32 statistics); `_RMSNorm` when a gradient is needed."""
    if grad_needed(x, weight) and is_fused("rms_norm"):
        return _RMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


# ---- SwiGLU ----------------------------------------------------------------------------------

def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return F.silu(g) * u


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u saving g and u only; the backward recomputes silu(g)."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return swiglu_reference(g, u)

    @staticmethod
    def backward(ctx, go):
        g, u = ctx.saved_tensors  # the same kernels as autograd of the two ops
        gg = torch.ops.aten.silu_backward(go * u, g) if ctx.needs_input_grad[0] else None
        gu = go * F.silu(g) if ctx.needs_input_grad[1] else None
        return gg, gu


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u, the gated MLP's product; `_SwiGLU` when a gradient is needed (and g, u share a dtype)."""
    if grad_needed(g, u) and g.dtype == u.dtype and is_fused("swiglu"):
        return _SwiGLU.apply(g, u)
    return swiglu_reference(g, u)


# ---- the recurrence gate's mix ---------------------------------------------------------------

def gate_mix_reference(z: torch.Tensor, h_new: torch.Tensor, h_old: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """g * h_new + (1 - g) * h_old with g = sigmoid(z), computed in `dt`, returned in h_new's dtype."""
    g = torch.sigmoid(z.to(dt))
    return torch.lerp(h_old.to(dt), h_new.to(dt), g).to(h_new.dtype)


class _GateMix(torch.autograd.Function):
    """`gate_mix_reference` saving z, h_new and h_old as they are (in their own, possibly bf16, precision;
    h_new and h_old are kept anyway for W_g's gradient) instead of `dt` copies of the states and of g."""

    @staticmethod
    def forward(ctx, z, h_new, h_old, dt):
        ctx.save_for_backward(z, h_new, h_old)
        ctx.dt = dt
        return gate_mix_reference(z, h_new, h_old, dt)

    @staticmethod
    def backward(ctx, go):
        z, h_new, h_old = ctx.saved_tensors
        dt = ctx.dt
        g = torch.sigmoid(z.to(dt))
        go = go.to(dt)
        g_new = go * g
        gz = (go * (h_new.to(dt) - h_old.to(dt)) * g * (1 - g)).to(z.dtype)
        return gz, g_new.to(h_new.dtype), (go - g_new).to(h_old.dtype), None


def gate_mix(z: torch.Tensor, h_new: torch.Tensor, h_old: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """The gate's lerp(h_old, h_new, sigmoid(z)) in `dt`; `_GateMix` when a gradient is needed."""
    if grad_needed(z, h_new, h_old) and is_fused("gate_mix"):
        return _GateMix.apply(z, h_new, h_old, dt)
    return gate_mix_reference(z, h_new, h_old, dt)


# ---- the Controller's prefix-mean pooling and norm -------------------------------------------

def prefix_sums(h: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running sums over the positions of h [B, T, H] (float32) and their counts [B, T]; m [B, T]
    (float32, 1 = real token) keeps padding out, None counts every position."""
    if m is None:
        counts = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32).expand(h.shape[:2])
        return h.float().cumsum(dim=1), counts
    return (h.float() * m.unsqueeze(-1)).cumsum(dim=1), m.cumsum(dim=1)


def prefix_mean(h: torch.Tensor, m: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of positions <= t (float32), and the [B, T, 1] counts it divided by."""
    sums, counts = prefix_sums(h, m)
    counts = counts.clamp(min=1.0).unsqueeze(-1)
    return sums / counts, counts


def prefix_mean_rms_norm_reference(h: torch.Tensor, m: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(prefix_mean(h, m)[0], weight, eps)


class _PrefixMeanRMSNorm(torch.autograd.Function):
    """weight * rms_norm(prefix mean of h), saving h and the [.., 1] rsqrt for the backward pass instead
    of the float32 means (a fresh [B, T, H] float32 tensor); the backward recomputes them (one cumsum)."""

    @staticmethod
    def forward(ctx, h, m, weight, eps):
        n, r = rms_normalize(prefix_mean(h, m)[0], eps)
        ctx.save_for_backward(h, m, weight, r)
        return weight * n

    @staticmethod
    def backward(ctx, gy):
        h, m, weight, r = ctx.saved_tensors
        means, counts = prefix_mean(h, m)
        n = means * r
        gw = (gy * n).sum_to_size(weight.shape) if ctx.needs_input_grad[2] else None
        gh = None
        if ctx.needs_input_grad[0]:
            gn = gy * weight
            gs = r * (gn - n * (gn * n).mean(-1, keepdim=True)) / counts
            gh = gs.flip(1).cumsum(dim=1).flip(1)  # the cumsum's backward: a reversed cumsum
            if m is not None:
                gh = gh * m.unsqueeze(-1)
            gh = gh.to(h.dtype)
        return gh, None, gw, None


def prefix_mean_rms_norm(h: torch.Tensor, m: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * rms_norm(mean of positions <= t of h), float32 (the Controller's pooling "prefix_mean"
    followed by its norm, for a float32 weight); `_PrefixMeanRMSNorm` when a gradient is needed."""
    if grad_needed(h, weight) and is_fused("prefix_mean_rms_norm"):
        return _PrefixMeanRMSNorm.apply(h, m, weight, eps)
    return prefix_mean_rms_norm_reference(h, m, weight, eps)


# ---- the chunked losses ---------------------------------------------------------------------

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


def chunked_head_loss_reference(hidden, weight, bias, targets) -> torch.Tensor:
    """The mean over targets != IGNORE of CE(hidden @ W^T + b, target), from the full float32 logits."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE)


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
            logits = F.linear(h, weight, bias)  # as the reference: under autocast, in its dtype
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


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      chunk: int) -> torch.Tensor:
    """The mean over targets != IGNORE of CE(hidden @ weight^T + bias, target); hidden [N, H], targets [N].
    `_ChunkedHeadLoss` (chunks of `chunk` tokens) unless the head itself needs a gradient."""
    if is_fused("chunked_head_loss") and not grad_needed(weight, bias):
        return _ChunkedHeadLoss.apply(hidden, weight, bias, targets, chunk, grad_needed(hidden))
    return chunked_head_loss_reference(hidden, weight, bias, targets)


def chunked_token_losses_reference(hidden, weight, bias, targets) -> torch.Tensor:
    """CE(hidden @ W^T + b, target) of each token [N] (0 where ignored), from the full float32 logits."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE, reduction="none")


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


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         chunk: int) -> torch.Tensor:
    """Each token's CE(hidden @ weight^T + bias, target) [N] (0 where target == IGNORE): the per-step
    readouts' loss. `_ChunkedTokenLosses` (chunks of `chunk` tokens) unless the head needs a gradient."""
    if is_fused("chunked_token_losses") and not grad_needed(weight, bias):
        return _ChunkedTokenLosses.apply(hidden, weight, bias, targets, chunk, grad_needed(hidden))
    return chunked_token_losses_reference(hidden, weight, bias, targets)


def kl_sum(logits: torch.Tensor, teacher_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over the valid positions of KL(softmax(teacher_logits) || softmax(logits)), in float32; the
    teacher's side carries no gradient."""
    s = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        lt = F.log_softmax(teacher_logits.float(), dim=-1)
    return torch.where(valid, (lt.exp() * (lt - s)).sum(-1), 0.0).sum()


def chunked_kl_reference(hidden, weight, bias, teacher, t_weight, t_bias, valid) -> torch.Tensor:
    with torch.no_grad():
        t_logits = F.linear(teacher, t_weight, t_bias)
    return kl_sum(F.linear(hidden, weight, bias), t_logits, valid) / valid.sum().clamp(min=1)


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


def chunked_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, teacher: torch.Tensor,
               t_weight: torch.Tensor, t_bias: torch.Tensor | None, valid: torch.Tensor, chunk: int) -> torch.Tensor:
    """The mean over the valid positions ([N] bool) of KL(softmax(teacher @ t_weight^T + t_bias) ||
    softmax(hidden @ weight^T + bias)); hidden, teacher [N, H]. `_ChunkedKL` (chunks of `chunk` tokens)
    unless the student's head itself needs a gradient."""
    if is_fused("chunked_kl") and not grad_needed(weight, bias):
        return _ChunkedKL.apply(hidden, weight, bias, teacher, t_weight, t_bias, valid, chunk, grad_needed(hidden))
    return chunked_kl_reference(hidden, weight, bias, teacher, t_weight, t_bias, valid)


# ---- the loss against stored top-K teacher targets -------------------------------------------------

def topk_kl_terms(ls: torch.Tensor, ls_tail: torch.Tensor, t_ids: torch.Tensor, t_logp: torch.Tensor) -> torch.Tensor:
    """Each token's KL(teacher || student) over K + 1 buckets: the teacher's top-K tokens and the rest.

    ls: the student's float32 log-softmax [N, V]; ls_tail [N]: the log of its mass outside t_ids;
    t_ids [N, K]: the teacher's top-K token ids; t_logp [N, K + 1]: their log-probabilities and, last,
    the log of the teacher's remaining mass. A bucket the teacher gives no mass adds nothing."""
    lp = t_logp.float()
    ls_k = torch.cat([ls.gather(-1, t_ids), ls_tail.unsqueeze(-1)], dim=-1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - ls_k), 0.0).sum(-1)


def tail_log_mass(logits: torch.Tensor, lse: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """log of the softmax mass outside `t_ids` [N, K], from float32 logits [N, V] and their logsumexp:
    exact where 1 - sum(top-K) would cancel."""
    return torch.logsumexp(logits.scatter(-1, t_ids, float("-inf")), dim=-1) - lse


def topk_distill(logits, targets, t_ids, t_logp, ce_weight, kl_weight):
    """(ce_weight * CE + kl_weight * KL, CE, KL): the means over targets != IGNORE ([N]) of the next-token
    cross-entropy of `logits` [N, V] and of `topk_kl_terms`, in float32 (autograd differentiates them)."""
    logits = logits.float()
    valid = targets != IGNORE
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum") / n
    lse = torch.logsumexp(logits, dim=-1)
    kl = torch.where(valid, topk_kl_terms(logits - lse.unsqueeze(-1), tail_log_mass(logits, lse, t_ids), t_ids,
                                          t_logp), 0.0).sum() / n
    return ce_weight * ce + kl_weight * kl, ce.detach(), kl.detach()


def chunked_topk_distill_reference(hidden, weight, bias, targets, t_ids, t_logp, ce_weight, kl_weight):
    """`topk_distill` of the full logits hidden @ W^T + b."""
    return topk_distill(F.linear(hidden, weight, bias), targets, t_ids, t_logp, ce_weight, kl_weight)


class _ChunkedTopKDistill(torch.autograd.Function):
    """(ce_weight * CE + kl_weight * KL, CE, KL) chunk by chunk, the KL against stored top-K targets
    (`topk_kl_terms`); with `need_grad` the forward also forms d loss / d hidden and saves only that.

    Per token, with q the student's softmax, p the teacher's stored top-K probabilities (set S),
    p_tail its remaining mass and q_tail the student's mass outside S, the KL's gradient with
    respect to the logits is q_j * (sum(p) + p_tail) - p_j on S and q_j * (sum(p) + p_tail - p_tail
    / q_tail) off it: the teacher's distribution with its tail spread as the student spreads its own.
    One head product forward and one for the gradient, as the plain next-token loss."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, t_ids, t_logp, ce_weight, kl_weight, chunk, need_grad):
        valid = targets != IGNORE
        n = valid.sum().clamp(min=1)
        ce_sum = hidden.new_zeros((), dtype=torch.float32)
        kl_sum_ = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.empty_like(hidden) if need_grad else None
        k = t_ids.shape[-1]
        for i in range(0, hidden.shape[0], chunk):
            part = slice(i, i + chunk)
            v, t, ids, lp = valid[part], targets[part].clamp(min=0), t_ids[part], t_logp[part].float()
            logits = F.linear(hidden[part], weight, bias)  # under autocast, in its dtype (as the plain loss)
            lf = logits.float()
            lse = torch.logsumexp(lf, dim=-1)
            ls_tail = tail_log_mass(lf, lse, ids)
            ls = lf.sub_(lse.unsqueeze(-1))  # log-softmax, in place of the upcast logits
            ce_sum = ce_sum + torch.where(v, -ls.gather(-1, t.unsqueeze(-1)).squeeze(-1), 0.0).sum()
            kl_sum_ = kl_sum_ + torch.where(v, topk_kl_terms(ls, ls_tail, ids, lp), 0.0).sum()
            if need_grad:
                p = lp.exp()
                p_top, p_tail = p[:, :k], p[:, k]
                mass = p.sum(-1)
                r = torch.where(p_tail > 0, p_tail * torch.exp(-ls_tail), 0.0)  # p_tail / q_tail
                q = ls.exp_()  # softmax, in place
                q_top = q.gather(-1, ids)
                g = q * (kl_weight * (mass - r) + ce_weight).unsqueeze(-1)
                g.scatter_add_(-1, ids, kl_weight * (r.unsqueeze(-1) * q_top - p_top))
                g.scatter_add_(-1, t.unsqueeze(-1), torch.full_like(q_top[:, :1], -ce_weight))
                g.mul_(v.unsqueeze(-1) / n)
                grad[part] = (g.to(logits.dtype) @ weight.to(logits.dtype)).to(hidden.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        ce, kl = ce_sum / n, kl_sum_ / n
        ctx.mark_non_differentiable(ce, kl)
        return ce_weight * ce + kl_weight * kl, ce, kl

    @staticmethod
    def backward(ctx, go, _ce, _kl):
        (grad,) = ctx.saved_tensors
        return ((grad.float() * go).to(grad.dtype),) + (None,) * 9


def chunked_topk_distill(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                         t_ids: torch.Tensor, t_logp: torch.Tensor, ce_weight: float, kl_weight: float, chunk: int):
    """(ce_weight * CE + kl_weight * KL, CE, KL), the means over targets != IGNORE ([N]) of the next-token
    cross-entropy of hidden @ weight^T + bias ([N, H]) and of its KL from the stored top-K teacher targets
    (t_ids [N, K], t_logp [N, K + 1]; `topk_kl_terms`). `_ChunkedTopKDistill` unless the head needs a gradient."""
    if is_fused("chunked_topk_distill") and not grad_needed(weight, bias):
        return _ChunkedTopKDistill.apply(hidden, weight, bias, targets, t_ids, t_logp, float(ce_weight),
                                         float(kl_weight), chunk, grad_needed(hidden))
    return chunked_topk_distill_reference(hidden, weight, bias, targets, t_ids, t_logp, ce_weight, kl_weight)
