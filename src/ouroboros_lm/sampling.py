"""Which blocks the i-th batch holds, as a function of (seed, i) only: a resumed run sees exactly
the batches an uninterrupted one would, and each of several processes takes its own slice of
every global batch. One source: a seeded epoch-wise shuffle of its blocks. Several sources
mixed by weight: positions dealt in chunks (below), each source reading its own shuffle."""
from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # positions per deal of a mixture: each source's share is exact to 1/CHUNK per chunk


class BlockSampler:
    """A seeded, epoch-wise shuffle of `n_blocks` blocks, stateless in the position."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks = n_blocks
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # int32 (4 bytes a block) draws the same permutation as int64
            dtype = torch.int32 if self.n_blocks < 2**31 else torch.int64
            self._perms = {epoch: torch.randperm(self.n_blocks, generator=g, dtype=dtype)}
        return self._perms[epoch]

    def at(self, position: int) -> int:
        """The block at `position` of the endless sequence of shuffled epochs."""
        return int(self._perm(position // self.n_blocks)[position % self.n_blocks])

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        start = (index * world_size + rank) * batch_size
        return torch.stack([self._perm(p // self.n_blocks)[p % self.n_blocks]
                            for p in range(start, start + batch_size)]).long()


def quotas(weights: list[float], total: int = CHUNK) -> list[int]:
    """Positions of each source per chunk: weight x total, rounded by largest remainders."""
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    exact = w * total
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return out.tolist()


class MixtureSampler:
    """Blocks of several sources (laid end to end: source s holds blocks offsets[s] ...) drawn in
    the proportions of `weights`, whatever their sizes. Positions are dealt in chunks of CHUNK:
    each chunk holds `quotas(weights)` positions of each source in a seeded order, and a source's
    k-th position overall takes the k-th block of its own seeded epoch-wise shuffle."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.quota = np.asarray(quotas(weights), dtype=np.int64)
        self.offsets = np.cumsum([0] + list(sizes))[:-1].tolist()
        self.seed = seed
        self.samplers = [BlockSampler(n, seed + 104_729 * (s + 1)) for s, n in enumerate(sizes)]
        self._deal: tuple[int, np.ndarray, np.ndarray] | None = None

    def deal(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of `chunk`, how many of that source's positions precede it in the chunk)."""
        if self._deal is None or self._deal[0] != chunk:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_777_777 + chunk)
            source = np.repeat(np.arange(len(self.quota)), self.quota)[torch.randperm(CHUNK, generator=g).numpy()]
            before = np.zeros(CHUNK, dtype=np.int64)
            for s in range(len(self.quota)):
                at = np.flatnonzero(source == s)
                before[at] = np.arange(at.size)
            self._deal = (chunk, source, before)
        return self._deal[1], self._deal[2]

    def at(self, position: int) -> int:
        chunk, j = divmod(position, CHUNK)
        source, before = self.deal(chunk)
        s = int(source[j])
        return self.offsets[s] + self.samplers[s].at(chunk * int(self.quota[s]) + int(before[j]))

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        start = (index * world_size + rank) * batch_size
        return torch.tensor([self.at(p) for p in range(start, start + batch_size)], dtype=torch.long)

    def counts(self, positions: int) -> list[int]:
        """Blocks of each source among the first `positions` positions (all ranks together)."""
        chunk, j = divmod(positions, CHUNK)
        out = chunk * self.quota
        if j:
            out = out + np.bincount(self.deal(chunk)[0][:j], minlength=len(self.quota))
        return [int(x) for x in out]
