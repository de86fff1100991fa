"""Storage of one layer's mixed-precision KV cache: quantized pools and the residual window.

A layer's cached tokens live in up to three segments:

- the **high-bit pool**: prompt tokens the layer's prefill found important, plus decoded tokens
  once they leave the residual window;
- the **low-bit pool**: the other prompt tokens (absent when ``low_bits=0``: evicted);
- the **residual window**: the most recent tokens, unquantized, at positions ``L - r .. L - 1``.

A pool holds ``P`` slots per sequence, ``P`` a multiple of ``group_size`` (sequences of a batch
keep different numbers of tokens: the shorter ones end in empty slots).  ``pos [B, P]`` int32 is
the position of each slot, ``-1`` for an empty slot.  Keys are quantized per channel over groups
of ``group_size`` slots, values per token over groups of ``vgroup`` channels (``quant.py``).
Slots are in ascending position order within the prompt part, decoded groups follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import quant


@dataclass
class Pool:
    """One precision's tokens of one layer: ``keys``/``values`` hold [B, Hkv, P, d] tensors
    (quantized or, at 16 bits, raw), ``pos [B, P]`` int32."""

    keys: quant.Quantized
    values: quant.Quantized
    pos: torch.Tensor

    @property
    def bits(self) -> int:
        return self.keys.bits

    @property
    def slots(self) -> int:
        return self.pos.shape[-1]

    def nbytes(self) -> int:
        return self.keys.nbytes() + self.values.nbytes() + _nbytes(self.pos)

    def tensors(self) -> tuple:
        """(k data, k scale, k mid, v data, v scale, v mid, pos): the decode kernels' view."""
        k, v = self.keys, self.values
        return (k.data, k.scale, k.mid, v.data, v.scale, v.mid, self.pos)


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def make_pool(keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, bits: int,
              group_size: int, vgroup: int) -> Pool:
    """Quantize keys/values [B, Hkv, P, d] (P a multiple of group_size) into a pool."""
    return Pool(quant.quantize(keys, bits, group_size, per_channel=True),
                quant.quantize(values, bits, vgroup, per_channel=False), pos.to(torch.int32))


def pool_at(keys: torch.Tensor, values: torch.Tensor, gather: torch.Tensor, pos: torch.Tensor,
            bits: int, group_size: int, vgroup: int) -> Pool:
    """``make_pool`` of the tokens at positions ``gather [B, P]`` of keys/values [B, Hkv, n, d]."""
    return make_pool(gather_tokens(keys, gather), gather_tokens(values, gather), pos, bits,
                     group_size, vgroup)


def append_group(pool: Pool, keys: torch.Tensor, values: torch.Tensor,
                 pos: torch.Tensor) -> Pool:
    """A new pool with ``group_size`` more slots: keys/values [B, Hkv, G, d], pos [B, G]."""
    new = make_pool(keys, values, pos, pool.bits, pool.keys.group_size, pool.values.group_size)
    return Pool(_cat(pool.keys, new.keys), _cat(pool.values, new.values),
                torch.cat([pool.pos, new.pos], dim=-1))


def _cat(a: quant.Quantized, b: quant.Quantized) -> quant.Quantized:
    def cat(x, y):
        return None if x is None else torch.cat([x, y], dim=-2)
    return quant.Quantized(cat(a.data, b.data), cat(a.scale, b.scale), cat(a.mid, b.mid), a.bits,
                           a.group_size, a.per_channel, a.dtype)


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def slot_positions(member: torch.Tensor, counts: list[int], group_size: int):
    """Pool layout of the positions where ``member [B, m]`` is True.

    Returns ``gather [B, P]`` int64 (positions to read; empty slots repeat a member of the same
    sequence, or position 0, so that they do not widen a quantization range) and ``pos [B, P]``
    int32 (-1 for empty slots), with ``P = round_up(max(counts), group_size)``.  ``counts`` are
    the per-sequence member counts, already on the host."""
    B, m = member.shape
    P = round_up(max(counts, default=0), group_size)
    if P == 0:
        empty = member.new_zeros(B, 0, dtype=torch.long)
        return empty, empty.to(torch.int32)
    order = torch.sort((~member).to(torch.uint8), dim=-1, stable=True).indices  # members first
    order = order[:, :P] if P <= m else torch.cat(
        [order, order.new_zeros(B, P - m)], dim=-1)
    count = torch.tensor(counts, device=member.device)[:, None]
    slot = torch.arange(P, device=member.device)[None, :]
    filled = slot < count
    last = order.gather(1, (count - 1).clamp(min=0))
    gather = torch.where(filled, order, torch.where(count > 0, last, 0))
    return gather, torch.where(filled, gather, -1).to(torch.int32)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, Hkv, n, d], idx [B, P] -> [B, Hkv, P, d] (contiguous)."""
    B, h, _, d = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, h, idx.shape[1], d))
