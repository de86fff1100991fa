"""ZipVLConfig: every knob of the sparse prefill, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

KERNELS = ("auto", "sdpa", "flex")
HIGH_BITS = (16, 8, 4, 2)
LOW_BITS = (16, 8, 4, 2, 0)
STAGES = ("scores", "budget", "selection")
CACHE_FIELDS = ("high_bits", "low_bits", "group_size", "residual_length")


@dataclass(frozen=True)
class ZipVLConfig:
    """Settings of ZipVL sparse prefill (DESIGN.md section 1).

    tau:            fraction of the probe attention mass the kept tokens must reach, in (0, 1].
                    ``tau=1.0`` keeps every valid token (exact dense attention).
    recent_probes:  number of most recent valid positions used as probe queries (>= 0).
    random_probes:  number of further probe positions drawn from the remaining valid ones (>= 0).
    keep_recent:    the most recent valid tokens always kept (>= 1: the last token's output must exist).
    min_keep:       lower bound on the per-sequence budget (>= 1).
    ratio:          ``None`` = adaptive budget from ``tau``; a float in (0, 1] fixes the kept fraction
                    of valid tokens (the fixed-budget baseline).
    sparse_queries: True = paper mode (only important queries are computed, other rows are zero);
                    False = every query is computed, keys restricted to the important set.
    seed:           salt of the deterministic probe sampler (>= 0).
    dense_layers:   the first ``dense_layers`` attention layers keep dense prefill attention (>= 0;
                    the layer of a site is the last integer in its module path, e.g.
                    ``layers.3.self_attn``, else its order in the graph).  Early layers can mix
                    the whole image before attention concentrates (FastV keeps 2 dense); measured
                    on the toy VLM in BENCHMARKS.md (issue 5).  0: every layer is sparse.
    min_tokens:     prompts shorter than this keep dense attention (>= 0).  Selection costs a fixed
                    ~0.8 ms per layer on an H200: slower than cuDNN at 8K tokens, 3x faster at 32K
                    (BENCHMARKS.md); 0 sparsifies every prompt.
    kernel:         "sdpa" reads the budget on the host and runs SDPA on the compacted prefix
                    (fastest, one host sync per layer, not CUDA-graph capturable); "flex" keeps the
                    budget on the device (FlexAttention, graph capturable); "auto" picks "flex" under
                    CUDA-graph modes ("reduce-overhead", "max-autotune") and "sdpa" otherwise.
    stop_after:     measurement only (the paper's Table E, ``benchmarks/end_to_end.py``): None
                    (default) runs ZipVL; "scores" (probe scoring), "budget" (+ sort and cumsum
                    of the adaptive budget) or "selection" (+ normalized scores and top-k) run the
                    selection up to that stage and then exact dense attention, so the output is
                    dense and the cost of each stage can be timed.

    Mixed-precision KV cache (``ZipVLCache``; DESIGN.md section 1, step 8):

    high_bits:      bits of the cached K/V of tokens the layer's prefill found important: one of
                    16 (unquantized), 8, 4, 2.
    low_bits:       bits of the other prompt tokens: one of 16, 8, 4, 2, or 0 (evicted); at most
                    ``high_bits``.
    group_size:     quantization group (>= 1): keys share a range over ``group_size`` consecutive
                    cached tokens of one channel (KIVI), values over ``min(group_size, head_dim)``
                    channels of one token (which must divide the head dim).
    residual_length: most recent tokens kept unquantized (>= 0); decoded tokens enter this window
                    and leave it ``group_size`` at a time, into the high-bit pool.
    """

    tau: float = 0.975
    recent_probes: int = 64
    random_probes: int = 64
    keep_recent: int = 64
    min_keep: int = 1
    ratio: float | None = None
    sparse_queries: bool = True
    seed: int = 0
    dense_layers: int = 0
    min_tokens: int = 0
    kernel: str = "auto"
    stop_after: str | None = None
    high_bits: int = 4
    low_bits: int = 2
    group_size: int = 128
    residual_length: int = 128

    def __post_init__(self) -> None:
        _check_number("tau", self.tau, 0.0, 1.0, low_open=True)
        for name, low in (("recent_probes", 0), ("random_probes", 0), ("keep_recent", 1),
                          ("min_keep", 1), ("seed", 0), ("min_tokens", 0),
                          ("dense_layers", 0)):
            _check_int(name, getattr(self, name), low)
        if self.recent_probes + self.random_probes < 1:
            raise ValueError("recent_probes + random_probes must be >= 1 "
                             f"(got {self.recent_probes} + {self.random_probes})")
        if self.ratio is not None:
            _check_number("ratio", self.ratio, 0.0, 1.0, low_open=True)
        if not isinstance(self.sparse_queries, bool):
            raise ValueError(f"sparse_queries must be a bool (got {self.sparse_queries!r})")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS} (got {self.kernel!r})")
        if self.stop_after is not None and self.stop_after not in STAGES:
            raise ValueError(f"stop_after must be None or one of {STAGES} "
                             f"(got {self.stop_after!r})")
        if isinstance(self.high_bits, bool) or self.high_bits not in HIGH_BITS:
            raise ValueError(f"high_bits must be one of {HIGH_BITS} (got {self.high_bits!r})")
        if isinstance(self.low_bits, bool) or self.low_bits not in LOW_BITS:
            raise ValueError(f"low_bits must be one of {LOW_BITS} (0 evicts; got {self.low_bits!r})")
        if self.low_bits > self.high_bits:
            raise ValueError(f"low_bits must be <= high_bits (got low_bits={self.low_bits}, "
                             f"high_bits={self.high_bits})")
        _check_int("group_size", self.group_size, 1)
        _check_int("residual_length", self.residual_length, 0)

    @property
    def keeps_everything(self) -> bool:
        """True when the budget is the whole valid sequence (tau=1 or ratio=1)."""
        return self.ratio == 1.0 or (self.ratio is None and self.tau >= 1.0)

    def replace(self, **fields) -> "ZipVLConfig":
        return dataclasses.replace(self, **fields)

    def prefill_settings(self) -> dict:
        """The fields the sparse prefill reads (every field but the cache's)."""
        return {n: getattr(self, n) for n in self.field_names() if n not in CACHE_FIELDS}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= {low} (got {value!r})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low} (got {value})")


def _check_number(name: str, value, low: float, high: float, low_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in {'(' if low_open else '['}{low}, {high}] "
                         f"(got {value!r})")
    ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}] (got {value})")
