"""Throwaway (session 21): variants of ``triton_decode._merge`` to see what the ~4 us the merge
adds after the partials (session 20) are made of.  ``merge_nowait``: no ``gdc_wait`` (racy: reads
partials that may not be written yet; timing only).  ``merge_noread``: waits, then reads one
chunk instead of all (wrong output; timing only)."""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from zipvl_compile.runtime.triton_decode import _slot_bias


@triton.jit
def merge_nowait(M, L, ACC, OUT, Q, RK, RV, RPOS, BIAS, Hkv, n_heads_per_kv, n_chunks, r_slots,
           r_base, scale, s_ob, s_oh, s_qb, s_qh, s_rkb, s_rkh, s_rvb, s_rvh, s_pb, s_bb,
           D: tl.constexpr, QR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
           HAS_RES: tl.constexpr, HAS_RPOS: tl.constexpr, HAS_BIAS: tl.constexpr,
           BLOCK_R: tl.constexpr, GDC_WAIT: tl.constexpr):
    """One program per (query head, BLOCK_D channels): merge the partials of every chunk of
    every segment (split over channels so that a batch-1 call still has enough programs).
    HAS_RES: the residual window (16-bit K/V [B, Hkv, r_slots, D], slot stride D, positions
    RPOS [B, r_slots] or ``r_base + slot``) is attended here first, in fp32, instead of by a
    partial kernel of its own (each of a head's D / BLOCK_D programs computes the same
    scores: a few hundred slots).  GDC_WAIT: launched behind the partial kernels (``PDL``):
    the window is attended while they finish, the partials are read after they have."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = (bh * QR + row) * n_chunks
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_RES:
        ch = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + (hk * n_heads_per_kv + row) * s_qh + ch).to(tl.float32)
        for r0 in tl.range(0, r_slots, BLOCK_R):
            n = r0 + tl.arange(0, BLOCK_R)
            live = n < r_slots
            k = tl.load(RK + b * s_rkb + hk * s_rkh + n[:, None] * D + ch[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_R]
            bias, ok = _slot_bias(RPOS, BIAS, b, n, live, r_base, s_pb, s_bb, HAS_RPOS,
                                  HAS_BIAS)
            if HAS_BIAS:
                s += bias
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)  # [BLOCK_R]
            w_run = tl.exp(m_run - m_safe)
            v = tl.load(RV + b * s_rvb + hk * s_rvh + n[:, None] * D + d[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            acc = acc * w_run + tl.sum(p[:, None] * v, axis=0)
            l_run = l_run * w_run + tl.sum(p, axis=0)
            m_run = m_new
    for c0 in tl.range(0, n_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = cs < n_chunks
        m_c = tl.load(M + first + cs, mask=ok, other=float("-inf"))
        l_c = tl.load(L + first + cs, mask=ok, other=0.0)
        a_c = tl.load(ACC + (first + cs)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_c = tl.exp(m_c - m_safe)  # [BLOCK_C]
        w_run = tl.exp(m_run - m_safe)  # [1]
        acc = acc * w_run + tl.sum(a_c * w_c[:, None], axis=0)
        l_run = l_run * w_run + tl.sum(l_c * w_c, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(OUT + b * s_ob + (hk * n_heads_per_kv + row) * s_oh + d,
             out.to(OUT.dtype.element_ty))


@triton.jit
def merge_noread(M, L, ACC, OUT, Q, RK, RV, RPOS, BIAS, Hkv, n_heads_per_kv, n_chunks, r_slots,
           r_base, scale, s_ob, s_oh, s_qb, s_qh, s_rkb, s_rkh, s_rvb, s_rvh, s_pb, s_bb,
           D: tl.constexpr, QR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
           HAS_RES: tl.constexpr, HAS_RPOS: tl.constexpr, HAS_BIAS: tl.constexpr,
           BLOCK_R: tl.constexpr, GDC_WAIT: tl.constexpr):
    """One program per (query head, BLOCK_D channels): merge the partials of every chunk of
    every segment (split over channels so that a batch-1 call still has enough programs).
    HAS_RES: the residual window (16-bit K/V [B, Hkv, r_slots, D], slot stride D, positions
    RPOS [B, r_slots] or ``r_base + slot``) is attended here first, in fp32, instead of by a
    partial kernel of its own (each of a head's D / BLOCK_D programs computes the same
    scores: a few hundred slots).  GDC_WAIT: launched behind the partial kernels (``PDL``):
    the window is attended while they finish, the partials are read after they have."""
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = (bh * QR + row) * n_chunks
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    if HAS_RES:
        ch = tl.arange(0, D)
        q = tl.load(Q + b * s_qb + (hk * n_heads_per_kv + row) * s_qh + ch).to(tl.float32)
        for r0 in tl.range(0, r_slots, BLOCK_R):
            n = r0 + tl.arange(0, BLOCK_R)
            live = n < r_slots
            k = tl.load(RK + b * s_rkb + hk * s_rkh + n[:, None] * D + ch[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale  # [BLOCK_R]
            bias, ok = _slot_bias(RPOS, BIAS, b, n, live, r_base, s_pb, s_bb, HAS_RPOS,
                                  HAS_BIAS)
            if HAS_BIAS:
                s += bias
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe)  # [BLOCK_R]
            w_run = tl.exp(m_run - m_safe)
            v = tl.load(RV + b * s_rvb + hk * s_rvh + n[:, None] * D + d[None, :],
                        mask=live[:, None], other=0.0).to(tl.float32)
            acc = acc * w_run + tl.sum(p[:, None] * v, axis=0)
            l_run = l_run * w_run + tl.sum(p, axis=0)
            m_run = m_new
    if GDC_WAIT:
        gdc_wait()
    for c0 in tl.range(0, tl.minimum(n_chunks, 1), BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = cs < n_chunks
        m_c = tl.load(M + first + cs, mask=ok, other=float("-inf"))
        l_c = tl.load(L + first + cs, mask=ok, other=0.0)
        a_c = tl.load(ACC + (first + cs)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_c = tl.exp(m_c - m_safe)  # [BLOCK_C]
        w_run = tl.exp(m_run - m_safe)  # [1]
        acc = acc * w_run + tl.sum(a_c * w_c[:, None], axis=0)
        l_run = l_run * w_run + tl.sum(l_c * w_c, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(OUT + b * s_ob + (hk * n_heads_per_kv + row) * s_oh + d,
             out.to(OUT.dtype.element_ty))
