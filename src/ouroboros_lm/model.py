"""`OuroborosModel`: prelude -> recurrent block x N -> coda, on a pretrained decoder."""
from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from torch import nn

from .config import OuroborosConfig
from .layers import build_context, decoder_layer, layer_window, rms_norm
from .loss import OuroborosOutput, causal_lm_loss, head_loss, lazy_logits  # noqa: F401 (causal_lm_loss: re-exported)
from .recurrence import RecurrentBlock
from .surgery import split_layers


def check_token_range(input_ids: torch.Tensor, vocab_size: int, what: str = "input_ids") -> None:
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} must lie in [0, {vocab_size - 1}] (vocab_size {vocab_size}); got values in [{lo}, {hi}]")


class OuroborosModel(nn.Module):
    """A recursive transformer built from a pretrained Llama-family decoder.

    Build it with `OuroborosModel.from_base(base, OuroborosConfig(...))`. Only the Controller
    (or static vectors), the recurrence gate and the per-step norms are trainable.
    """

    def __init__(self, config: OuroborosConfig, base: nn.Module, prelude, recurrent, coda, bases, base_config=None):
        super().__init__()
        self.config = config
        self.base_config = base_config if base_config is not None else base.config  # the full model's config
        self.base_name = getattr(base.config, "_name_or_path", "") or type(base).__name__
        inner = base.model
        self.embed_tokens = inner.embed_tokens
        self.rotary_emb = inner.rotary_emb
        self.prelude = nn.ModuleList(prelude)
        self.coda = nn.ModuleList(coda)
        self.norm = inner.norm
        self.lm_head = base.lm_head
        self.prelude_windows = [layer_window(l, base.config) for l in prelude]
        self.coda_windows = [layer_window(l, base.config) for l in coda]
        for p in self.parameters():
            p.requires_grad_(False)
        w = recurrent.self_attn.q_proj.weight
        # The trainable parts are initialised from config.seed on the CPU, whatever the device, so
        # the same config gives the same initial model everywhere (and the global RNG is untouched).
        with torch.random.fork_rng(devices=[]), torch.device("meta" if w.is_meta else "cpu"):
            torch.manual_seed(config.seed)
            self.recurrent = RecurrentBlock(recurrent, layer_window(recurrent, base.config), bases, config, base.config.hidden_size)
        self.recurrent.to(w.device)
        self._depth_rng = random.Random(config.seed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_base(cls, base: nn.Module, config: OuroborosConfig | None = None, compute_bases: bool = True) -> "OuroborosModel":
        """Convert `base` (a Hugging Face Llama/Qwen2/Qwen3/Mistral causal LM).

        The base model is consumed: its removed layers are deleted to free memory, and the
        layers that are kept are shared with the returned model (and frozen).
        """
        from .adapter import kept_fingerprints
        from .surgery import check_architecture

        config = config or OuroborosConfig()
        check_architecture(base)
        config.validate(num_layers=len(base.model.layers))
        fingerprints = kept_fingerprints(base, config)  # before surgery: identifies the base in adapters
        full_config = copy.deepcopy(base.config)
        prelude, recurrent, coda, bases = split_layers(base, config, compute_bases)
        model = cls(config, base, prelude, recurrent, coda, bases, base_config=full_config)
        model.kept_fingerprints = fingerprints
        return model

    # ------------------------------------------------------------------ adapters
    def save_adapter(self, directory) -> "Path":
        """Write adapter_config.json + adapter_model.safetensors (trained weights and the frozen
        SVD bases) to `directory`, atomically."""
        from .adapter import save_adapter

        return save_adapter(self, directory)

    @classmethod
    def load_adapter(cls, directory, base=None, dtype=torch.float32, device=None, **overrides) -> "OuroborosModel":
        """Rebuild a saved model on `base` (a model, a source, or None for the recorded base).
        Fails with AdapterError (a ValueError) on a different base, a different layer split, an
        incompatible format or a corrupt file, before anything is loaded."""
        from .adapter import load_adapter

        return load_adapter(directory, base=base, dtype=dtype, device=device, **overrides)

    @property
    def vocab_size(self) -> int:
        return self.embed_tokens.num_embeddings

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ------------------------------------------------------------------ parameters
    def trainable_parameter_breakdown(self) -> dict[str, int]:
        r = self.recurrent
        parts = {
            "controller": r.controller,
            "static": r.static,
            "gate": r.gate,
            "step_norms": r.step_norms,
        }
        out = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in parts.items() if m is not None}
        out["total"] = sum(out.values())
        return out

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ forward
    def resolve_depth(self, depth: int | None) -> int:
        if depth is None:
            if self.training:
                return self._depth_rng.choice(self.config.depths)
            return max(self.config.depths)
        return self.config.check_depth(depth)

    def check_inputs(self, input_ids: torch.Tensor, attention_mask=None, labels=None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError("input_ids must be an integer tensor of shape [batch, seq_len]")
        if input_ids.numel() == 0:
            raise ValueError("input_ids is empty")
        if input_ids.device.type == "cpu":  # on an accelerator this check would cost a host sync per forward
            check_token_range(input_ids, self.vocab_size)
        max_pos = getattr(self.base_config, "max_position_embeddings", None)
        if max_pos is not None and input_ids.shape[1] > max_pos:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the base model's max_position_embeddings {max_pos}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(t.shape)}")

    def _embed(self, input_ids, attention_mask):
        h = self.embed_tokens(input_ids)
        if attention_mask is None:
            position_ids = torch.arange(input_ids.shape[1], device=h.device).unsqueeze(0)
            key_padding = None
        else:
            attention_mask = attention_mask.to(h.device)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            key_padding = attention_mask.bool()
        ctx = build_context(self.rotary_emb, h, position_ids, key_padding)
        return h, ctx

    def _run_stack(self, layers, windows, h, ctx):
        for layer, w in zip(layers, windows):
            h = decoder_layer(layer, h, ctx, window=w)
        return h

    def _head(self, h, labels):
        h = rms_norm(h, self.norm.weight, self.norm.variance_epsilon)  # = self.norm(h), saving less
        return (head_loss(h, self.lm_head, labels) if labels is not None else None), lazy_logits(h, self.lm_head)

    def forward(self, input_ids, attention_mask=None, labels=None, depth: int | None = None) -> OuroborosOutput:
        depth = self.resolve_depth(depth)
        self.check_inputs(input_ids, attention_mask, labels)
        h, ctx = self._embed(input_ids, attention_mask)
        h = self._run_stack(self.prelude, self.prelude_windows, h, ctx)
        h = self.recurrent(h, ctx, depth, mask=attention_mask)
        h = self._run_stack(self.coda, self.coda_windows, h, ctx)
        loss, logits = self._head(h, labels)
        return OuroborosOutput(loss=loss, logits=logits, depth=depth)

    def forward_baseline(self, input_ids, attention_mask=None, labels=None) -> OuroborosOutput:
        """The pruned stack (prelude + recurrent layer once + coda) with nothing added."""
        self.check_inputs(input_ids, attention_mask, labels)
        h, ctx = self._embed(input_ids, attention_mask)
        h = self._run_stack(self.prelude, self.prelude_windows, h, ctx)
        h = decoder_layer(self.recurrent.layer, h, ctx, window=self.recurrent.window)
        h = self._run_stack(self.coda, self.coda_windows, h, ctx)
        loss, logits = self._head(h, labels)
        return OuroborosOutput(loss=loss, logits=logits, depth=None)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 32, depth: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id=None, seed: int | None = None, **kwargs) -> torch.Tensor:
        """Prompt + new token ids, through the recursion with a per-step KV cache (see generate.py).
        Left-pad batches and pass their attention_mask. baseline=True uses the pruned stack."""
        from .generate import generate

        return generate(self, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, depth=depth,
                        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, seed=seed, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"base={self.base_name!r}, prelude={c.n_prelude}, recurrent_layer={c.recurrent_layer}, "
            f"coda={c.n_coda}, variant={c.variant}, rank={c.rank}, gate={c.gate}, pooling={c.pooling}"
        )
