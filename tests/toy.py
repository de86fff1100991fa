"""A tiny decoder with plain SDPA attention (optionally GQA, masked, or unfused), used by tests.

``attention`` selects the attention implementation: "sdpa" (F.scaled_dot_product_attention,
causal or with a mask), "unfused" (matmul -> scale -> +mask -> softmax -> matmul) or a callable
``fn(q, k, v, mask, layer) -> out`` (for comparisons with the reference)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, layer, attention):
        super().__init__()
        self.heads, self.kv_heads, self.d = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.d, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.d, bias=False)
        self.o_proj = nn.Linear(heads * self.d, dim, bias=False)
        self.layer, self.attention = layer, attention

    def forward(self, x, mask=None):
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.heads, self.d).transpose(1, 2)
        k = self.k_proj(x).view(B, n, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.kv_heads, self.d).transpose(1, 2)
        if callable(self.attention):
            o = self.attention(q, k, v, mask, self.layer)
        elif self.attention == "sdpa":
            gqa = self.heads != self.kv_heads
            if mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            g = self.heads // self.kv_heads
            k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            w = torch.matmul(q, k.transpose(2, 3)) * (self.d ** -0.5)
            if mask is not None:
                w = w + mask
            w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
            o = torch.matmul(w, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, n, -1))


class ToyDecoder(nn.Module):
    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, layers=2, attention="sdpa"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Attention(dim, heads, kv_heads, i, attention)
                                    for i in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, mask=None):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x, mask)
        return self.head(x)


def padding_mask(lengths, n, left=True, dtype=torch.bool):
    """[B, 1, n, n] causal mask of sequences padded on the left (or right) to n, as transformers
    5 builds it: no query attends a padding key, so padded rows are empty (left) or see the
    valid prefix but not themselves (right).  Returns (mask, valid [B, n])."""
    B = len(lengths)
    pos = torch.arange(n)
    valid = torch.stack([(pos >= n - L) if left else (pos < L) for L in lengths])
    ok = (pos[None, :] <= pos[:, None])[None] & valid[:, None, :]
    if dtype == torch.bool:
        return ok[:, None], valid
    return torch.zeros(B, 1, n, n).masked_fill(~ok[:, None], torch.finfo(dtype).min), valid


def index_built_mask_sdpa(q, k, v, pad, q_offset=0):
    """Attention with a mask built from index vectors as transformers' ``sdpa_mask`` does under
    torch.compile (causal & key padding, expanded to [B, 1, n, n]; ``pad`` [B, m >= n]: its
    first n columns are read, as a later generate() call's attention mask is)."""
    B, n = pad.shape[0], q.shape[-2]
    q_idx = (torch.arange(n) + q_offset)[None, None, :, None]
    kv_idx = (torch.arange(n) + 0)[None, None, None, :]
    mask = q_idx.new_ones((), dtype=torch.bool) & (kv_idx <= q_idx).to(q.device)
    mask = mask & pad[torch.arange(B)[:, None, None, None], kv_idx].to(q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(B, -1, n, n),
                                          enable_gqa=True)
