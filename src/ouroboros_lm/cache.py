"""The cache that lets generation feed one new token at a time through the recursion.

It keeps keys and values of every prelude layer, of *each recurrence step separately* (the
same layer sees different hidden states at step s and s+1), and of every coda layer, plus
per step the running sum and count that the Controller's causal prefix-mean pooling needs,
and the rotary position and padding of every position so far; for the exit rules that read each
step's prediction (kl, entropy), also a KV slot per coda layer per step, for that step's readout.
`OuroborosModel.forward(...,
cache=)` reads and extends it; `tests/test_generate.py` checks it against recomputing the
whole prefix every token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .controller import PoolState
from .layers import KVSlot


@dataclass
class StepCache:
    """What one recurrence step (or the baseline's single application) keeps."""

    kv: list[KVSlot]  # one per layer of the recurrent block, in order
    pool: PoolState = field(default_factory=PoolState)
    readout: list[KVSlot] | None = None  # the coda layers of this step's readout (exit rules kl, entropy)


@dataclass
class OuroborosCache:
    depth: int | None  # None: the pruned baseline (recurrent layer once, nothing added)
    prelude: list[KVSlot]
    steps: list[StepCache]
    coda: list[KVSlot]
    key_padding: torch.Tensor | None = None  # [B, S] bool, all positions so far (None: no padding seen)
    next_position: torch.Tensor | None = None  # [B] rotary position of the next real token
    length: int = 0  # positions cached so far

    @classmethod
    def empty(cls, n_prelude: int, n_coda: int, depth: int | None, capacity: int | None = None,
              readout: bool = False, block_layers: int = 1) -> "OuroborosCache":
        """capacity: total positions (prompt + new tokens) to preallocate the KV buffers for;
        readout: keep each step's readout coda layers too (exit rules that read predictions);
        block_layers: the layers of the recurrent block (a slot for each, at every step)."""
        slot = lambda: KVSlot(capacity)  # noqa: E731
        n_steps = depth if depth is not None else 1
        steps = [StepCache([slot() for _ in range(block_layers)], readout=[slot() for _ in range(n_coda)] if readout else None)
                 for _ in range(n_steps)]
        return cls(depth, [slot() for _ in range(n_prelude)], steps, [slot() for _ in range(n_coda)])

    @property
    def keeps_readouts(self) -> bool:
        return bool(self.steps) and self.steps[0].readout is not None

    def check(self, depth: int | None, readout: bool = False) -> None:
        if depth != self.depth:
            what = lambda d: "the pruned baseline" if d is None else f"depth {d}"  # noqa: E731
            raise ValueError(f"this cache was built for {what(self.depth)}; the forward asked for {what(depth)}")
        if readout != self.keeps_readouts:
            raise ValueError("an exit rule that reads each step's prediction (kl, entropy) needs a cache with per-step "
                             "readout slots, new_cache(depth, readout=True), and only such a rule may use one")

    def extend(self, attention_mask: torch.Tensor | None, batch: int, new: int, device) -> tuple:
        """Positions for `new` tokens appended to every row: (position_ids [B, new], key padding
        of all positions [B, S] or None, the pooling mask of the new positions or None)."""
        new_mask = (torch.ones(batch, new, dtype=torch.long, device=device) if attention_mask is None
                    else attention_mask.to(device).long())
        if self.next_position is None:
            self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        position_ids = (self.next_position[:, None] + new_mask.cumsum(-1) - 1).clamp(min=0)
        self.next_position = self.next_position + new_mask.sum(-1)
        if self.key_padding is None and attention_mask is not None and not bool(new_mask.all()):
            self.key_padding = torch.ones(batch, self.length, dtype=torch.bool, device=device)
        if self.key_padding is not None:
            self.key_padding = torch.cat([self.key_padding, new_mask.bool()], dim=1)
        return position_ids, self.key_padding, (new_mask if self.key_padding is not None else None)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep (and repeat or permute) the batch rows `index` [B'] of everything cached: beam
        search reorders its beams this way, and `index` may repeat a row or drop one."""
        slots = self.prelude + [k for s in self.steps for k in s.kv] + [r for s in self.steps for r in s.readout or []] + self.coda
        for slot in slots:
            if slot.k is not None:
                slot.k, slot.v = slot.k.index_select(0, index.to(slot.k.device)), slot.v.index_select(0, index.to(slot.v.device))
        for s in self.steps:
            if s.pool.sum is not None:
                s.pool.sum, s.pool.count = s.pool.sum[index.to(s.pool.sum.device)], s.pool.count[index.to(s.pool.count.device)]
        if self.key_padding is not None:
            self.key_padding = self.key_padding[index.to(self.key_padding.device)]
        if self.next_position is not None:
            self.next_position = self.next_position[index.to(self.next_position.device)]
