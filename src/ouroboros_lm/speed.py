"""The speed and size users buy, measured in the runtime they deploy: stock transformers on a plain model folder
(`export --format plain`, or the base itself) and llama.cpp (llama-cpp-python) on a GGUF file.

Every model of a comparison is loaded in one process and timed in interleaved rounds (model A, B, C, then A, B, C
again...), so a slow moment of a shared machine hits them all alike; the median round of each is reported, and the
ratios between models (`round_ratio`: the median of each round's ratio) are what to read. Models of one runtime are
measured together and runtimes one after the other: the two runtimes' thread pools each spin for a while after their
work, and interleaved across runtimes they slow each other down by an order of magnitude on a 2-core machine. Per model: prompt (prefill) tokens/s, batch-1 greedy decode tokens/s with
the runtime's own KV cache, bytes on disk, bytes of weights, and (`peak_memory`) the peak resident memory of a fresh
process that loads it and runs the same prompt and decode. The ideal speed-up of a pruned model is the ratio of
weights each token reads (`weights_per_token`): layers plus the head.
"""
from __future__ import annotations

import inspect
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Speed:
    """One model's measurement: tokens/s per round (prompt, decode), sizes in bytes."""

    name: str
    runtime: str
    prompt_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    disk_bytes: int = 0
    weight_bytes: int = 0
    peak_rss_bytes: int | None = None
    weights_per_token: int = 0

    @property
    def prompt(self) -> float:
        return statistics.median(self.prompt_tps)

    @property
    def decode(self) -> float:
        return statistics.median(self.decode_tps)


def round_ratio(speed: Speed, ref: Speed, what: str = "decode") -> float:
    """The median over rounds of speed / ref measured in the same round: a slow moment of the machine slows both
    models of a round, so the ratio of a round is steadier than the ratio of the two medians."""
    a, b = (getattr(s, f"{what}_tps") for s in (speed, ref))
    return statistics.median(x / y for x, y in zip(a, b))


def disk_bytes(path: Path) -> int:
    """Bytes of a model on disk: a GGUF file, or a folder's weight files."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))


def weights_per_token(config) -> int:
    """Weights one decoded token reads: every decoder layer's and the head's (the embedding row is a lookup)."""
    h, inter, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    d = getattr(config, "head_dim", None) or h // heads
    layer = h * d * (2 * heads + 2 * kv) + 3 * h * inter
    return L * layer + config.vocab_size * h


class TransformersRunner:
    """A plain model folder in stock transformers: prefill, then greedy decode through its DynamicCache."""

    runtime = "transformers"

    def __init__(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.config = self.model.config
        # transformers 5.25 names the cache argument `cache` (`past_key_values` is deprecated); earlier releases not
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.no_grad()
    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        """(prompt seconds, decode seconds, the greedy tokens)."""
        from transformers import DynamicCache

        x = torch.tensor([ids])
        cache = {self.cache_arg: DynamicCache(config=self.config), "use_cache": True}
        t0 = time.perf_counter()
        out = self.model(x, logits_to_keep=1, **cache)  # the head on the last position only, as decoding needs
        t1 = time.perf_counter()
        tokens = []
        nxt = out.logits[0, -1].argmax()
        for _ in range(new_tokens):
            tokens.append(int(nxt))
            out = self.model(nxt.view(1, 1), **cache)
            nxt = out.logits[0, -1].argmax()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens


class LlamaCppRunner:
    """A GGUF file in llama.cpp (llama-cpp-python): prefill, then greedy decode through its KV cache."""

    runtime = "llama.cpp"

    def __init__(self, path: str | Path, threads: int | None = None, n_ctx: int = 1024):
        from llama_cpp import Llama

        self.path = Path(path)
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or torch.get_num_threads(),
                         n_batch=n_ctx, logits_all=False, verbose=False)

    def weight_bytes(self) -> int:
        return self.path.stat().st_size

    def last_logits(self):
        """The logits of the last position evaluated (llama.cpp's own buffer, as a numpy view)."""
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def run(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        t1 = time.perf_counter()
        tokens = []
        nxt = int(self.last_logits().argmax())
        for _ in range(new_tokens):
            tokens.append(nxt)
            self.llm.eval([nxt])
            nxt = int(self.last_logits().argmax())
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, tokens

    def close(self) -> None:
        self.llm.close()


def measure(runners: dict, ids: list[int], new_tokens: int = 64, rounds: int = 5, warmup: int = 1) -> dict[str, Speed]:
    """Interleaved rounds over `runners` (name -> runner); `warmup` rounds first, not counted."""
    out = {name: Speed(name, r.runtime, weight_bytes=r.weight_bytes()) for name, r in runners.items()}
    for i in range(warmup + rounds):
        for name, r in runners.items():
            prompt_s, decode_s, _ = r.run(ids, new_tokens)
            if i >= warmup:
                out[name].prompt_tps.append(len(ids) / prompt_s)
                out[name].decode_tps.append(new_tokens / decode_s)
    return out


# The peak is the process's own high-water mark: Linux's VmHWM (ru_maxrss would carry over the measuring process's
# size through fork and exec); elsewhere ru_maxrss (bytes on macOS).
PEAK_SCRIPT = """
import json, resource, sys
from ouroboros_lm.speed import LlamaCppRunner, TransformersRunner
kind, path, ids, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
runner = TransformersRunner(path) if kind == "transformers" else LlamaCppRunner(path)
runner.run(ids, new)
try:
    hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(int(hwm.split()[1]) * 1024)
except OSError:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024))
"""


def peak_memory(runtime: str, path: str | Path, ids: list[int], new_tokens: int) -> int:
    """Peak resident bytes of a fresh process that loads the model and runs the prompt and decode once."""
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, runtime, str(path), json.dumps(ids), str(new_tokens)],
                         capture_output=True, text=True, check=True)
    return int(run.stdout.strip().splitlines()[-1])
