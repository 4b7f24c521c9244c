"""Where and in what precision things run, decided once and shared by training, evaluation,
generation, the CLI and the recipes: bf16 on a GPU (bf16 base weights, bf16 autocast,
float32 trainable parts), float32 on the CPU."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "no", "bf16", "fp16")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    mixed_precision: str  # "no", "bf16" or "fp16"

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the frozen base weights."""
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mixed_precision]

    def autocast(self):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def default_seq_len(self) -> int:
        return 2048 if self.device.type == "cuda" else 256


def choose_runtime(mixed_precision: str = "auto") -> Runtime:
    """auto: bf16 on a GPU, no mixed precision (float32) on the CPU."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision must be one of {', '.join(PRECISIONS)}; got {mixed_precision!r}")
    cuda = torch.cuda.is_available()
    mp = ("bf16" if cuda else "no") if mixed_precision == "auto" else mixed_precision
    return Runtime(torch.device("cuda" if cuda else "cpu"), mp)


def release_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one precision per process; a second run in the same process (a notebook,
    a sweep, a test) with another precision would be refused. Forget the earlier precision; the
    process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    previous = AcceleratorState._shared_state.get("_mixed_precision")
    if previous is not None and str(previous) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
