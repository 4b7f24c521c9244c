"""`OuroborosHFConfig`: an Ouroboros model's configuration as a `transformers` configuration
(model_type "ouroboros"). Kept apart from the model class (`hf.py`) so that `import ouroboros_lm`
registers it with `AutoConfig` without importing transformers' modeling code; the model class is
registered with `AutoModelForCausalLM` when the first such configuration is created
(`on_create`, wired by the package), which every way of loading the model goes through.
"""
from __future__ import annotations

from typing import Callable

from transformers import AutoConfig, PretrainedConfig

from .config import OuroborosConfig
from .policy import RecursionPolicy, legacy_policy

MODEL_TYPE = "ouroboros"
# Fields of the base model's configuration that tools read from the top-level config
# (sequence length, vocabulary, special tokens).
MIRRORED = ("vocab_size", "hidden_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


class OuroborosHFConfig(PretrainedConfig):
    """ouroboros: the `OuroborosConfig` as a dict; policy: the `RecursionPolicy` as a dict (folders
    exported before it had its own entry kept it inside `ouroboros`); base: the FULL base model's config as a dict
    (its `model_type` included); base_model: where the base came from; base_fingerprints: the
    kept weights' fingerprints (so `save_adapter` on a loaded model still identifies the base);
    depth: the recurrence depth forward and generate use (None: the policy's default_depth);
    baseline: run the pruned stack instead of the recursion."""

    model_type = MODEL_TYPE

    ouroboros: dict | None = None
    policy: dict | None = None
    base: dict | None = None
    base_model: str = ""
    base_fingerprints: dict | None = None
    depth: int | None = None
    baseline: bool = False
    vocab_size: int | None = None
    hidden_size: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.ouroboros = dict(self.ouroboros or {})
        self.base = dict(self.base or {})
        self.base_fingerprints = dict(self.base_fingerprints or {})
        for key in MIRRORED:
            if getattr(self, key) is None and self.base.get(key) is not None:
                setattr(self, key, self.base[key])
        self.tie_word_embeddings = bool(self.base.get("tie_word_embeddings", self.tie_word_embeddings))
        if self.ouroboros:
            cfg = OuroborosConfig.from_dict(self.ouroboros)  # validated here, not at the first forward
            self.recursion_policy().check(cfg.max_depth)
            if self.depth is not None:
                cfg.check_depth(self.depth)
        super().__post_init__(**kwargs)
        if on_create:
            on_create[0]()

    def check(self) -> OuroborosConfig:
        """Raise ValueError unless this is an exported model's configuration, typed and bounded like an
        adapter's: the OuroborosConfig valid, `baseline` a boolean, `depth` within max_depth, the base's
        config present, and the fingerprints recorded for exactly the layers the split keeps."""
        where = f"{self._name_or_path or 'the model'}/config.json"
        if not isinstance(self.ouroboros, dict) or not self.ouroboros:
            raise ValueError(f"{where}: 'ouroboros' is empty or not a mapping: not a model `ouroboros export` wrote")
        try:
            cfg = OuroborosConfig.from_dict(self.ouroboros)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} holds an invalid 'ouroboros' configuration: {e}") from None
        try:
            self.recursion_policy().check(cfg.max_depth)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where} holds an invalid 'policy': {e}") from None
        if not isinstance(self.baseline, bool):
            raise ValueError(f"{where}: 'baseline' must be true or false; got {self.baseline!r}")
        if self.depth is not None and (not isinstance(self.depth, int) or isinstance(self.depth, bool)):
            raise ValueError(f"{where}: 'depth' must be an integer or null; got {self.depth!r}")
        if self.depth is not None:
            cfg.check_depth(self.depth, f"{where}: depth")
        layers = self.base.get("num_hidden_layers") if isinstance(self.base, dict) else None
        if not isinstance(self.base.get("model_type"), str) or not isinstance(layers, int) or isinstance(layers, bool):
            raise ValueError(f"{where}: 'base' must hold the base model's configuration (model_type, num_hidden_layers)")
        want = {f"layer.{i}" for i in cfg.kept_layers(layers)} | {"embed_tokens", "norm", "lm_head"}
        if not isinstance(self.base_fingerprints, dict) or set(self.base_fingerprints) != want:
            raise ValueError(f"{where}: the layer split ({cfg.split_text()}) does not match the layers its fingerprints "
                             "were recorded for: the config was edited or is corrupt")
        return cfg

    def ouroboros_config(self) -> OuroborosConfig:
        return OuroborosConfig.from_dict(self.ouroboros)

    def recursion_policy(self) -> RecursionPolicy:
        return RecursionPolicy.from_dict(self.policy) if self.policy else legacy_policy(self.ouroboros)

    def base_config(self):
        """The full base model's `transformers` configuration."""
        d = dict(self.base)
        return AutoConfig.for_model(d.pop("model_type"), **d)


# Called whenever an OuroborosHFConfig is created: the package registers the model class here.
on_create: list[Callable[[], None]] = []


def register_config() -> None:
    AutoConfig.register(MODEL_TYPE, OuroborosHFConfig, exist_ok=True)
