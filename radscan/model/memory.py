"""Memory matrices: banks of normal-anatomy vectors read with a sparse top-k attention.

SimSID keeps one memory per patch position (space-aware), so a patch is rebuilt only from what
was seen at its place in normal chests. Reads are sparse: a softmax over dot products, of which
only the `topk` largest weights survive (renormalised to sum 1). The forward pass uses those sparse
weights; gradients flow as if through the dense softmax (straight-through), as in the reference.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["sparse_read", "MemoryBank", "SpaceAwareMemory"]


def sparse_read(query: torch.Tensor, slots: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read each query from its bank with top-k sparse attention.

    Parameters
    ----------
    query : (N, K, D) - N samples, one query per bank
    slots : (K, S, D) - K banks of S vectors
    topk : number of slots that keep a weight

    Returns
    -------
    read : (N, K, D) weighted sums of slots
    weights : (N, K, S) the sparse weights used (each row has `topk` non-zeros summing to 1)
    """
    dense = torch.softmax(torch.einsum("nkd,ksd->nks", query, slots), dim=-1)
    keep = torch.zeros_like(dense).scatter_(-1, dense.topk(topk, dim=-1).indices, 1.0)
    sparse = dense * keep
    sparse = sparse / sparse.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sparse.dtype).tiny)
    weights = dense + (sparse - dense).detach()  # forward: sparse; backward: dense softmax
    return torch.einsum("nks,ksd->nkd", weights, slots), weights


class MemoryBank(nn.Module):
    """K independent banks of S vectors of length D.

    ``kind="learned"``: the slots are parameters. ``kind="queue"``: the slots are a FIFO of the most
    recent training features written with `push` (only while training; frozen at inference).
    """

    def __init__(self, banks: int, slots: int, dim: int, kind: str, topk: int):
        super().__init__()
        self.kind, self.topk = kind, topk
        initial = torch.randn(banks, slots, dim) / math.sqrt(dim)
        if kind == "learned":
            self.slots = nn.Parameter(initial)
        else:
            self.register_buffer("slots", initial)
            self.register_buffer("cursor", torch.zeros(banks, dtype=torch.long))

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """(N, K, D) -> (N, K, D)."""
        return sparse_read(query, self.slots.to(query.dtype), self.topk)[0]

    @torch.no_grad()
    def push(self, features: torch.Tensor) -> None:
        """Write (N, K, D) features into the queue, oldest out first. Ignored outside training."""
        if self.kind != "queue" or not self.training:
            return
        banks, size, _ = self.slots.shape
        features = features.detach()[-size:].to(self.slots.dtype)  # (n, K, D), n <= S
        count = features.shape[0]
        positions = (self.cursor[:, None] + torch.arange(count, device=self.slots.device)) % size  # (K, n)
        self.slots[torch.arange(banks, device=self.slots.device)[:, None], positions] = features.transpose(0, 1)
        self.cursor.add_(count).remainder_(size)


class SpaceAwareMemory(nn.Module):
    """One memory per patch position ("patch" level), optionally with a memory shared by the
    whole image ("image" level, part A's hierarchy); the reads of the levels are averaged."""

    def __init__(self, positions: int, slots: int, dim: int, kind: str, topk: int, levels: tuple[str, ...]):
        super().__init__()
        self.banks = nn.ModuleDict({
            level: MemoryBank(positions if level == "patch" else 1, slots, dim, kind, topk) for level in levels
        })

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """(B, P, D) -> (B, P, D)."""
        reads = [self._read(level, bank, query) for level, bank in self.banks.items()]
        return reads[0] if len(reads) == 1 else torch.stack(reads).mean(dim=0)

    def push(self, features: torch.Tensor) -> None:
        for level, bank in self.banks.items():
            bank.push(features if level == "patch" else features.reshape(-1, 1, features.shape[-1]))

    @staticmethod
    def _read(level: str, bank: MemoryBank, query: torch.Tensor) -> torch.Tensor:
        if level == "patch":
            return bank(query)
        return bank(query.reshape(-1, 1, query.shape[-1])).reshape(query.shape)
