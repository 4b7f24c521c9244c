"""`OuroborosModel`: prelude -> recurrent block x N -> coda, on a pretrained decoder.

`forward` is the only code that walks the stack. Training, evaluation, generation (with a
`cache`, one new token at a time) and the pruned baseline (`baseline=True`) all go through it.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from .peft_lora import inject_lora, adaptation_disabled, adaptation_parameter_count, adapted_parameters
from .cache import OuroborosCache
from .config import OuroborosConfig
from .exits import ExitKV, ExitRule, TokenExits
from .families import OWN_HEAD_TYPES, final_logits, scale_embeddings
from .generate import generate as generate_tokens
from .layers import AttentionContext, KVSlot, build_context, decoder_layer, get_projection, layer_window
from .loss import (StoredTeacher, Teacher, causal_lm_loss, default_chunk, distill_loss, head_loss, head_token_losses,
                   lazy_logits, stored_distill_loss, token_losses)
from .memory import check_trainable_size
from .ops import rms_norm
from .policy import RecursionPolicy
from .readout import StepReadout
from .recurrence import NO_TRAINING, RecurrentBlock, StepTraining
from .surgery import check_architecture, kept_fingerprints, split_layers
from .tuning import attach_deltas, tuned_parameter_count


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


def check_token_range(input_ids: torch.Tensor, vocab_size: int, what: str = "input_ids") -> None:
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} must lie in [0, {vocab_size - 1}] (vocab_size {vocab_size}); got values in [{lo}, {hi}]")


class OuroborosModel(nn.Module):
    """A recursive transformer built from a pretrained Llama-family decoder.

    Build it with `OuroborosModel.from_base(base, OuroborosConfig(...), RecursionPolicy(...))`. What
    trains: the Controller (or static vectors), the recurrence gate, the per-step norms and the input
    injection, as configured, and plain LoRA (PEFT) on the outer layers and the recurrent layer where
    `lora_rank` is set. With `heal_layers` it is the heal
    model instead: the pruned stack (its middle layers once each) with plain LoRA on every kept layer,
    the alternative to recursion that every comparison stands beside.

    base_name: where the base model comes from (recorded in adapters).
    base_fingerprints: fingerprints of the kept weights in the base (see `surgery.kept_fingerprints`).
    """

    def __init__(self, config: OuroborosConfig, base: nn.Module, prelude, recurrent, coda, bases,
                 base_config=None, base_name: str | None = None, base_fingerprints: dict | None = None,
                 policy: RecursionPolicy | None = None):
        super().__init__()
        self.config = config
        self.base_config = base_config if base_config is not None else base.config  # the full model's config
        self.base_name = base_name or getattr(base.config, "_name_or_path", "") or type(base).__name__
        self.base_fingerprints = dict(base_fingerprints or {})
        inner = base.model
        self.embed_tokens = inner.embed_tokens
        self.rotary_emb = inner.rotary_emb
        self.prelude = nn.ModuleList(prelude)
        self.coda = nn.ModuleList(coda)
        self.norm = inner.norm
        self.lm_head = base.lm_head
        self.windows = {"prelude": [layer_window(l, base.config) for l in prelude],
                        "coda": [layer_window(l, base.config) for l in coda]}
        for p in self.parameters():
            p.requires_grad_(False)
        w = get_projection(recurrent[0], "q").weight
        # The trainable parts are initialised from config.init_seed on the CPU, whatever the device, so
        # the same config gives the same initial model everywhere (and the global RNG is untouched).
        with torch.random.fork_rng(devices=[]), torch.device("meta" if w.is_meta else "cpu"):
            torch.manual_seed(config.init_seed)
            self.recurrent = RecurrentBlock(recurrent, [layer_window(l, base.config) for l in recurrent], bases, config,
                                            base.config.hidden_size, (policy or RecursionPolicy()).check(config.max_depth))
        self.recurrent.to(w.device)
        inject_lora(self)  # plain LoRA (PEFT) on the outer / recurrent layers, if configured
        for layer in self.tuned_layers():  # a heal model's layers trained in full (`tune_layers`)
            attach_deltas(layer)

    def tuned_layers(self) -> list[nn.Module]:
        """The layers `tune_layers` trains in full, in the order they run."""
        pos = self.config.tuned_positions()
        return ([self.prelude[i] for i in pos["prelude"]] + [self.recurrent.layer for _ in pos["block"]]
                + [self.coda[i] for i in pos["coda"]])

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, base: nn.Module, config: OuroborosConfig | None = None, compute_bases: bool = True,
                  base_name: str | None = None, policy: RecursionPolicy | None = None) -> "OuroborosModel":
        """Convert `base` (a Hugging Face Llama/Qwen2/Qwen3/Mistral causal LM), with the
        architecture `config` and the inference `policy` (default depth, damping; `RecursionPolicy`).

        The base model is consumed: its removed layers are deleted to free memory, and the
        layers that are kept are shared with the returned model (and frozen).
        compute_bases=False allocates the SVD bases without factoring (an adapter fills them).
        """
        config = config or OuroborosConfig()
        check_architecture(base)
        config.validate(num_layers=len(base.model.layers))
        (policy or RecursionPolicy()).check(config.max_depth)
        check_trainable_size(config, base.config.hidden_size, base.model.embed_tokens.weight.device,
                             extra=adaptation_parameter_count(config, base.model.layers[0], base.config.hidden_size)
                             + tuned_parameter_count(base.model.layers[0], len(config.tune_layers or ())))
        fingerprints = kept_fingerprints(base, config)  # before surgery: identifies the base in adapters
        full_config = copy.deepcopy(base.config)
        prelude, recurrent, coda, bases = split_layers(base, config, compute_bases)
        return cls(config, base, prelude, recurrent, coda, bases, base_config=full_config, base_name=base_name,
                   base_fingerprints=fingerprints, policy=policy)

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def policy(self) -> RecursionPolicy:
        """How the recursion runs when the caller does not say (`RecursionPolicy`): the default
        depth, the trained depth past which per-step parameters are reused, the damping past it."""
        return self.recurrent.policy

    @policy.setter
    def policy(self, policy: RecursionPolicy) -> None:
        self.recurrent.policy = policy.check(self.config.max_depth)

    # ------------------------------------------------------------------ parameters
    def trainable_parameter_breakdown(self) -> dict[str, int]:
        outer = adapted_parameters(self)
        if self.config.heal_layers:
            lora = sum(p.numel() for n, p in outer.items() if ".lora_" in n)
            tuned = sum(p.numel() for n, p in outer.items() if ".lora_" not in n)
            return {"lora": lora, **({"tuned_layers": tuned} if tuned else {}), "total": lora + tuned}
        out = {name: sum(p.numel() for p in m.parameters()) for name, m in self.recurrent.trainable_parts().items()}
        if self.config.lora_rank:
            out["outer_lora"] = sum(p.numel() for n, p in outer.items() if ".lora_" in n and not n.startswith("recurrent."))
        if self.config.lora_on_recurrent_layer:
            out["recurrent_lora"] = sum(p.numel() for n, p in outer.items() if n.startswith("recurrent."))
        out["total"] = sum(out.values())
        return out

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ forward
    def resolve_depth(self, depth: int | None) -> int:
        return self.policy.default_depth if depth is None else self.config.check_depth(depth)

    def check_inputs(self, input_ids: torch.Tensor, attention_mask=None, labels=None, past: int = 0) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError("input_ids must be an integer tensor of shape [batch, seq_len]")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if input_ids.device.type == "cpu":  # on an accelerator this check would cost a host sync per forward
            check_token_range(input_ids, self.vocab_size)
        max_pos = getattr(self.base_config, "max_position_embeddings", None)
        if max_pos is not None and past + input_ids.shape[1] > max_pos:
            raise ValueError(f"sequence length {past + input_ids.shape[1]} exceeds the base model's "
                             f"max_position_embeddings {max_pos}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(t.shape)}")

    def new_cache(self, depth: int | None = None, capacity: int | None = None, baseline: bool = False,
                  readout: bool = False) -> OuroborosCache:
        """An empty cache for cached decoding at `depth` (or of the pruned baseline); `readout`: with
        each step's readout coda layers, for an exit rule that reads predictions (kl, entropy)."""
        plain = baseline or self.config.heal_layers
        return OuroborosCache.empty(len(self.prelude), len(self.coda), None if plain else self.resolve_depth(depth),
                                    capacity, readout=readout and not plain,
                                    block_layers=1 if plain else len(self.recurrent.layers))  # plain: one layer once

    def embed(self, input_ids, attention_mask=None, cache: OuroborosCache | None = None):
        """(token embeddings h, the AttentionContext every layer shares, the pooling mask)."""
        h = scale_embeddings(self.embed_tokens(input_ids.to(self.device)), self.base_config)
        B, T = input_ids.shape
        if cache is not None:
            position_ids, key_padding, pool_mask = cache.extend(attention_mask, B, T, h.device)
            return h, build_context(self.rotary_emb, h, position_ids, key_padding, past_length=cache.length), pool_mask
        if attention_mask is None:
            position_ids, key_padding = torch.arange(T, device=h.device).unsqueeze(0), None
        else:
            attention_mask = attention_mask.to(h.device)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            key_padding = attention_mask.bool()
        return h, build_context(self.rotary_emb, h, position_ids, key_padding), attention_mask

    def run_layers(self, part: str, h: torch.Tensor, ctx: AttentionContext, slots: list[KVSlot] | None = None):
        """The frozen prelude or coda ("prelude" / "coda"), extending the cache `slots` if given."""
        layers = self.prelude if part == "prelude" else self.coda
        for i, (layer, window) in enumerate(zip(layers, self.windows[part])):
            h = decoder_layer(layer, h, ctx, window=window, kv=slots[i] if slots is not None else None)
        return h

    def logits_of(self, normed: torch.Tensor) -> torch.Tensor:
        """The LM head on final-normed hidden states (with the family's logit scaling / soft-cap)."""
        return final_logits(self.lm_head(normed), self.base_config)

    def head(self, h: torch.Tensor, labels: torch.Tensor | None = None,
             teacher: Teacher | StoredTeacher | None = None) -> OuroborosOutput:
        """Final norm and LM head. Llama heads (Phi-3 and SmolLM3 too): the loss from chunks of the vocabulary
        (never the whole float32 logits, `loss.head_loss`), the logits computed only when read (`loss.lazy_logits`).
        Families with another norm or scaled / soft-capped logits (Gemma 2/3, OLMo 2, Granite): their own norm
        and the plain loss.
        With a `teacher`, the loss also has its KL term (`loss.distill_loss`, chunked too); with stored
        targets (`loss.StoredTeacher`) both terms come from one pass (`loss.stored_distill_loss`)."""
        own_head = self.base_config.model_type in OWN_HEAD_TYPES
        if isinstance(teacher, StoredTeacher) and labels is not None:  # CE and KL from one pass over the logits
            h = self.norm(h) if own_head else rms_norm(h, self.norm.weight, self.norm.variance_epsilon)
            logits = self.logits_of(h) if own_head else None
            loss, ce, kl = stored_distill_loss(h, self.lm_head, labels, teacher, default_chunk(self.vocab_size), logits)
            out = OuroborosOutput(loss, logits if own_head else lazy_logits(h, self.lm_head))
            out.ce_loss, out.kl_loss = ce, kl
            return out
        if own_head:
            h = self.norm(h)
            logits = self.logits_of(h)
            out = OuroborosOutput(causal_lm_loss(logits, labels) if labels is not None else None, logits)
        else:
            h = rms_norm(h, self.norm.weight, self.norm.variance_epsilon)  # = self.norm(h), saving less
            out = OuroborosOutput(head_loss(h, self.lm_head, labels) if labels is not None else None,
                                  lazy_logits(h, self.lm_head))
        if teacher is not None and labels is not None:
            plain_head = None if own_head else self.lm_head
            kl = distill_loss(h, self.logits_of, teacher, labels, default_chunk(self.vocab_size), lm_head=plain_head)
            out.ce_loss, out.kl_loss = out.loss.detach(), kl.detach()
            out.loss = teacher.ce_weight * out.loss + teacher.weight * kl
        return out

    def token_losses_of(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each position's next-token loss [B, T] from coda output h (final norm, LM head; chunked, with
        its gradient formed in the same pass, for Llama heads)."""
        if self.base_config.model_type in OWN_HEAD_TYPES:
            return token_losses(self.logits_of(self.norm(h)), labels)
        return head_token_losses(rms_norm(h, self.norm.weight, self.norm.variance_epsilon), self.lm_head, labels)

    def token_exits(self, shape, ctx: AttentionContext, cache: OuroborosCache | None, rule, forced) -> TokenExits:
        """The exit state of one forward. The rules that read each step's prediction get it through the
        coda (stopped positions lending their last keys/values there too, cached per step) and the head."""
        def predict(s: int, h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            slots = cache.steps[s].readout if cache is not None else [None] * len(self.coda)
            x = self.run_layers("coda", h, ctx, [ExitKV(exits, slot, ("coda", i)) for i, slot in enumerate(slots)])
            return self.head(x[active]).logits.float().log_softmax(-1)

        exits = TokenExits(shape, self.device, rule, forced,
                           predict=predict if rule is not None and rule.reads_predictions else None)
        return exits

    def check_recursion_request(self, depth, baseline: bool, cache, exit_rule, exit_steps, readout_steps, labels) -> None:
        what = "the pruned baseline" if baseline else "a heal model"
        if (exit_rule is not None or exit_steps is not None) and depth is None:
            raise ValueError(f"{what} has no recursion to exit from")
        if cache is not None:
            cache.check(depth, readout=exit_rule is not None and exit_rule.reads_predictions)
        if readout_steps is None:
            return
        if depth is None:
            raise ValueError(f"{what} has no recursion steps to read out")
        if labels is None or cache is not None or exit_rule is not None or exit_steps is not None:
            raise ValueError("readout_steps needs labels, and works without a cache or an exit rule")

    def forward(self, input_ids, attention_mask=None, labels=None, depth: int | None = None, *,
                cache: OuroborosCache | None = None, baseline: bool = False, exit_rule: ExitRule | None = None,
                exit_steps: torch.Tensor | None = None, readout_steps=None,
                teacher: Teacher | StoredTeacher | None = None, training: StepTraining = NO_TRAINING) -> OuroborosOutput:
        """Logits (and the loss, given HF-aligned `labels`) of `input_ids` [B, T].

        depth: recurrence steps (default `policy.default_depth`); the maximum under adaptive exit.
            A heal model has no recursion and ignores it.
        baseline: the pruned stack (prelude + recurrent layer once + coda) with nothing added.
        cache: an `OuroborosCache` (`new_cache`) holding earlier positions; the new positions are
            appended to it, and the logits are those of the new positions only.
        exit_rule: per-token adaptive depth (`exits.ExitRule`); or exit_steps [B, T], the steps each
            position takes (replaying recorded decisions). The output's `steps` says how many ran.
        readout_steps: 1-based step counts (increasing, each <= depth; with labels, no cache or exit
            rule): the output's step_losses [K, B, T] are each position's loss had the recursion stopped
            after each of them (coda + head on that step's state, with gradients when enabled), and for a
            model with a halter, step_halts [K, B, T] its stop probabilities there. Only those steps pay
            for a readout (`readout.py`).
        teacher: distillation targets (`loss.Teacher` from the full model, or `loss.StoredTeacher`, its
            top-K predictions read from disk): with labels, the loss is `ce_weight * CE + weight * KL(teacher || ours)` (its terms in `ce_loss` / `kl_loss`).
        training: how the recursion's steps are differentiated while training (`StepTraining`:
            activation checkpointing, truncated backprop); the trainer passes its settings here.
        """
        heal = bool(self.config.heal_layers)  # a heal model: its stack once, with its LoRA (off for the baseline)
        depth = None if baseline or heal else self.resolve_depth(depth)
        self.check_inputs(input_ids, attention_mask, labels, past=cache.length if cache is not None else 0)
        self.check_recursion_request(depth, baseline, cache, exit_rule, exit_steps, readout_steps, labels)
        outer = adaptation_disabled(self) if baseline and self.config.adapts_outer_layers else contextlib.nullcontext()
        with outer:  # the pruned baseline runs the outer layers as the base has them
            h, ctx, pool_mask = self.embed(input_ids, attention_mask, cache)
            h = self.run_layers("prelude", h, ctx, cache.prelude if cache is not None else None)
            steps = cache.steps if cache is not None else None
            exits = None if exit_rule is None and exit_steps is None else \
                self.token_exits(input_ids.shape, ctx, cache, exit_rule, exit_steps)
            readout = None if readout_steps is None else StepReadout(
                readout_steps, depth, lambda x: self.token_losses_of(self.run_layers("coda", x, ctx), labels), h,
                self.recurrent.halter)
            if depth is None:
                h = self.recurrent.plain(h, ctx, kv=steps[0].kv if steps is not None else None)
            else:
                h = self.recurrent(h, ctx, depth, mask=pool_mask, cache=steps, exits=exits,
                                   observe=readout.observe if readout is not None else None, training=training)
            h = self.run_layers("coda", h, ctx, cache.coda if cache is not None else None)
            if cache is not None:
                cache.length += input_ids.shape[1]
            out = self.head(h, labels, teacher)
            out.steps = exits.steps if exits is not None else None
            if readout is not None:
                out.step_losses, out.step_halts = readout.finish(lambda: self.token_losses_of(h, labels))
        return out

    def forward_baseline(self, input_ids, attention_mask=None, labels=None) -> OuroborosOutput:
        """The pruned stack (prelude + recurrent layer once + coda) with nothing added."""
        return self(input_ids, attention_mask=attention_mask, labels=labels, baseline=True)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, depth: int | None = None,
                 **kwargs) -> torch.Tensor:
        """Prompt + new token ids, through the recursion with a per-step KV cache; see
        `generate.generate` for sampling, EOS, streaming and baseline=True."""
        return generate_tokens(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, depth=depth,
                        **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        if c.keep_layers is not None:
            kept = f"keep_layers={','.join(map(str, c.keep_layers))}, "
            return (f"base={self.base_name!r}, {kept}" + ("heal, " if c.heal_layers else
                    f"recurrent_layer={c.recurrent_layer}, block_layers={c.block_layers}, variant={c.variant}, ")
                    + f"lora_rank={c.lora_rank}")
        if c.heal_layers:
            return (f"base={self.base_name!r}, heal: prelude={c.n_prelude}, middle={c.heal_layers}, coda={c.n_coda}, "
                    f"lora_rank={c.lora_rank}")
        return (
            f"base={self.base_name!r}, prelude={c.n_prelude}, recurrent_layer={c.recurrent_layer}, "
            f"coda={c.n_coda}, variant={c.variant}, rank={c.rank}, gate={c.gate}, pooling={c.pooling}, "
            f"recurrent_kind={self.recurrent.kind}"
        )
