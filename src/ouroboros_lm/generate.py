"""Generation through the recursion, with a cache that makes each new token cost one pass
through P + depth + C layers on one position (`cache.OuroborosCache`, read and extended by
`OuroborosModel.forward`). `tests/test_generate.py` checks it against recomputing the whole
prefix every token. `GenerateConfig` is `ouroboros generate`'s settings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .settings import REQUIRED, setting, validate_fields

WHO = ("full", "baseline", "ouroboros")


def check_exit_rule(cfg, rule, top: int) -> None:
    """Refuse an exit rule (`exits.ExitRule`) the model `cfg` cannot follow, or a minimum it never reaches within `top` steps."""
    if rule.rule == "halter" and not cfg.halter:
        raise ValueError("--exit-rule halter needs an adapter with a trained halter (run `ouroboros train-halter` first)")
    if rule.min_steps > top:
        raise ValueError(f"--exit-min-steps {rule.min_steps} is more than the {top} steps allowed (--exit-max-depth)")


@dataclass
class GenerateConfig:
    """What `ouroboros generate` does: the prompt, the depth (or adaptive exit), decoding, which model."""

    adapter: str = setting(REQUIRED, "adapter folder")
    prompt: str = setting(REQUIRED, "prompt text")
    depth: int | str | None = setting(None, "recurrence depth (default: the adapter's default_depth), or auto: each "
                                      "token stops by the exit rule below, up to --exit-max-depth steps; at most "
                                      "the adapter's max_depth)", low=1, words=("auto",))
    exit_max_depth: int = setting(32, "maximum steps with --depth auto (at most the adapter's max_depth)", low=1)
    max_new_tokens: int = setting(64, "tokens to generate", low=1, high=1 << 20)
    do_sample: bool = setting(False, "sample instead of greedy decoding")
    temperature: float = setting(1.0, "sampling temperature", above=0)
    top_k: int | None = setting(None, "sample from the k most likely tokens", low=1)
    top_p: float | None = setting(None, "nucleus sampling mass", above=0, high=1.0)
    seed: int | None = setting(None, "sampling seed (reproducible)", low=0, high=2**63 - 1)
    chat: bool = setting(False, "wrap the prompt in the tokenizer's chat template")
    baseline: bool = setting(False, "generate with the pruned model instead", exclusive="model")
    full: bool = setting(False, "generate with the full base model instead", exclusive="model")
    compare: bool = setting(False, "print full, pruned and Ouroboros continuations", exclusive="model")

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def adaptive(self) -> bool:
        return self.depth == "auto"

    def runs(self) -> list[str]:
        """Which models generate, in order (of WHO)."""
        return list(WHO) if self.compare else ["full" if self.full else "baseline" if self.baseline else "ouroboros"]

    def sampling(self) -> dict:
        return dict(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def checked_depth(self, cfg, rule=None, default_depth: int | None = None) -> int:
        """The depth to run (the maximum with --depth auto; without --depth, the policy's
        `default_depth`) for the model `cfg`, checked with the exit `rule` before anything is loaded."""
        if self.depth is not None and cfg.heal_layers:
            cfg.check_depth_flag(self.depth, "--depth")  # a heal model has no depth to ask for
        if self.adaptive:
            top = cfg.check_depth(self.exit_max_depth, "--exit-max-depth")
            check_exit_rule(cfg, rule, top)
            return top
        return cfg.check_depth(default_depth if self.depth is None else self.depth, "--depth")


def next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """Greedy or sampled next token from logits [B, V]."""
    if not do_sample:
        return logits.argmax(-1)
    # in float64 (any positive Python temperature is representable) and shifted so the largest
    # logit is 0 before dividing: no 0/0 or inf - inf (NaN probabilities) however small it is
    logits = logits.double()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def check_generation_args(model, max_new_tokens, depth, do_sample, temperature, top_k, top_p) -> None:
    if model.config.pooling == "sequence_mean" and depth is not None:
        raise ValueError(
            "this model uses pooling='sequence_mean': every position's Controller reads the mean of the WHOLE "
            "sequence, future tokens included, so it is not causal and cannot generate (each new token would change "
            "the past). Use pooling='prefix_mean' or 'token'."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if do_sample:
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0 when sampling; got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1; got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")


def check_prompt(model, input_ids, attention_mask, max_new_tokens: int) -> None:
    model.check_inputs(input_ids, attention_mask)
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        raise ValueError("generate needs left padding: the last position of every row must be a real token")
    max_pos = getattr(model.base_config, "max_position_embeddings", None)
    if max_pos is not None and input_ids.shape[1] + max_new_tokens > max_pos:
        raise ValueError(f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the base model's "
                         f"max_position_embeddings {max_pos}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
             depth: int | None = None, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | list[int] | None = None, seed: int | None = None,
             use_cache: bool = True, baseline: bool = False, pad_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None, exit_rule=None,
             stats: dict | None = None) -> torch.Tensor:
    """Prompt + generated ids [B, T + new]. Batches must be left-padded, with `attention_mask`.

    baseline=True generates with the pruned stack instead of the recursion; `exit_rule` (an
    `exits.ExitRule`) lets each token stop recurring early (`depth` is then the maximum). A row
    that produced EOS is padded with `pad_token_id` (default: the EOS id) until all rows finish.
    `on_token(ids [B])` is called with every new token (streaming). With `stats` (a dict), its
    "steps" receives the recurrence steps each new token took ([B] per token)."""
    depth = None if baseline else model.resolve_depth(depth)
    check_generation_args(model, max_new_tokens, depth, do_sample, temperature, top_k, top_p)
    check_prompt(model, input_ids, attention_mask, max_new_tokens)
    device = model.device
    ids = input_ids.to(device)
    mask = attention_mask.to(device).long() if attention_mask is not None else None
    eos = sorted(set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or [])))
    eos_ids = torch.tensor(eos, device=device)
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    reads = exit_rule is not None and exit_rule.reads_predictions  # then the cache keeps each step's readout
    cache = (model.new_cache(depth, capacity=ids.shape[1] + max_new_tokens, baseline=baseline, readout=reads)
             if use_cache else None)
    kw = dict(depth=depth, baseline=baseline, exit_rule=exit_rule)
    step_ids, step_mask, was_training = ids, mask, model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            out = (model(step_ids, attention_mask=step_mask, cache=cache, **kw) if use_cache
                   else model(ids, attention_mask=mask, **kw))
            if stats is not None and out.steps is not None:
                stats.setdefault("steps", []).append(out.steps[:, -1].cpu())
            tok = next_token(out.logits[:, -1], do_sample, temperature, top_k, top_p, generator)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            ids = torch.cat([ids, tok[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(tok)[:, None]], dim=1)
            if on_token is not None:
                on_token(tok)
            if eos:
                done |= torch.isin(tok, eos_ids)
                if bool(done.all()):
                    break
            step_ids = tok[:, None]
            step_mask = torch.ones_like(step_ids) if mask is not None else None
    finally:
        model.train(was_training)
    return ids
