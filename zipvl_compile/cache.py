"""``ZipVLCache``: the mixed-precision KV cache of ZipVL, as a transformers ``Cache``.

Lifecycle of one layer (storage in ``runtime/kv_pool.py``, splitting in ``runtime/kv_split.py``):

1. **Prompt.**  The first update marks the prompt's K/V with this cache's token and the layer
   index (``zipvl::mark_prompt``), which at run time hands the cache an unquantized copy.
2. **Split.**  Under the zipvl backend, the layer's sparse prefill kernel finds the cache by its
   token and hands over its selection at run time (``runtime/handoff.py``): the prompt is split
   into the high-bit pool (tokens the prefill kept), the low-bit pool (the others; evicted at
   ``low_bits=0``) and the unquantized residual window (the last ``residual_length`` tokens),
   and the unquantized copy is dropped right there (by the graph-capturable ``flex`` kernel,
   one layer later: ``deliver``), so a prefill never holds a full-precision copy of every
   layer's prompt (the peak memory a user measures is below ``DynamicCache``'s).
   The layer adopts that split at its next update.  Without a hand-over (eager model, another
   backend, a dense fallback) that update splits the copy uniformly: every prompt token outside
   the residual window at ``high_bits``.  Neither path breaks the graph (one exception,
   once: ``deliver``).
3. **Decode.**  New tokens enter the residual window; whenever it reaches
   ``residual_length + group_size`` tokens, its oldest ``group_size`` are quantized into the
   high-bit pool.  ``update`` returns ``zipvl::cache_kv(...)``: position-ordered dequantized K/V
   for an attention the backend does not fuse, which the backend's decode pass replaces by one
   fused attention over the packed segments (``runtime/decode_attention.py``).

**Static shapes for CUDA graphs.**  With ``max_cache_len`` (prompt + generated tokens at
most), the step that adopts the split also moves the layer into fixed buffers sized for the whole
generation (``zipvl::make_static``, ``runtime/kv_static.py``); every later step writes in place
at device-held positions, so its graph has the same shapes and addresses each time and replays
from a CUDA graph (``compile_language_model(model, mode="reduce-overhead")``).  The cache is then
``is_compileable``, so ``generate()`` builds each step's attention mask outside the model, at the
fixed length ``max_cache_len``.

``stats()`` has one "kv-cache" row per layer saying which split was applied.
"""
from __future__ import annotations

import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .config import ZipVLConfig
from .runtime import handoff, kv_pool, kv_split, kv_static, stats
from .runtime import decode_attention  # noqa: F401  (registers zipvl::cache_kv)

logger = logging.getLogger("zipvl_compile")


class ZipVLLayer(CacheLayerMixin):
    """One decoder layer's cache (see the module docstring for its lifecycle)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, owner: "ZipVLCache", layer_idx: int):
        super().__init__()
        self.owner, self.config, self.layer_idx = owner, owner.config, layer_idx
        self.split = False
        self.evicted = False
        self.hi: kv_pool.Pool | None = None
        self.lo: kv_pool.Pool | None = None
        self.res_k = self.res_v = None
        self.span = None  # [0, L] tensor: its last dimension is the cached length, as a shape
        self.mark = None
        self.static: kv_static.StaticLayer | None = None  # with max_cache_len, after step 1
        self.moving = False  # the first decode step asked for ``static`` (make_static)

    @property
    def is_compileable(self) -> bool:
        """True with ``max_cache_len``: decode steps have static shapes (module docstring)."""
        return self.owner.capacity is not None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        d, dv = key_states.shape[-1], value_states.shape[-1]
        if d != dv:
            raise ValueError(f"ZipVLCache needs equal key and value head dims (got {d}, {dv})")
        self.vgroup = min(self.config.group_size, dv)
        if dv % self.vgroup:
            raise ValueError(f"group_size={self.config.group_size} must divide the head dim "
                             f"({dv}) or be >= it (values are quantized per token over "
                             "min(group_size, head_dim) channels)")
        self.is_initialized = True

    # ---- transformers Cache layer API ----

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.moving and self.static is None:
            raise RuntimeError(
                f"ZipVLCache layer {self.layer_idx}: the fixed buffers of its first decode step "
                "were never installed (zipvl::make_static did not run, e.g. because its graph "
                "was replayed from a CUDA graph); decoding on would read an empty cache")
        if self.span is None and not self.moving and self.static is None:  # the prompt
            n = key_states.shape[-2]
            limit = self.owner.capacity
            if limit is not None and n >= limit:
                raise ValueError(f"max_cache_len={limit} leaves no room to decode after a "
                                 f"prompt of {n} tokens")
            self.mark = handoff.mark_prompt(key_states, value_states, self.owner.token,
                                            self.layer_idx)
            self.span = key_states.new_empty(0, n)
            return key_states, value_states
        return torch.ops.zipvl.cache_kv(*self.append(key_states, value_states))

    def append(self, key_states, value_states) -> tuple:
        """Store tokens after the prompt (splitting the prompt first if not yet done).  Returns
        the layer's ``kernel_args()`` for this step."""
        if self.static is not None:
            if key_states.shape[-2] != 1:
                raise ValueError("a ZipVLCache with max_cache_len takes one token per decode "
                                 f"step (got {key_states.shape[-2]})")
            kv_static.append(self.static, key_states, value_states)
            return self.kernel_args()
        if not self.split and self.owner.capacity is not None:
            return self._first_static_step(key_states, value_states)
        if not self.split:
            self.install(self._take_split(key_states))
        self.res_k = torch.cat([self.res_k, key_states], dim=-2)
        self.res_v = torch.cat([self.res_v, value_states], dim=-2)
        self.span = torch.cat([self.span, self.span.new_empty(0, key_states.shape[-2])], dim=-1)
        while self.res_k.shape[-2] >= self.config.residual_length + self.config.group_size:
            self._flush_group()
        return self.kernel_args()

    def _first_static_step(self, key_states, value_states) -> tuple:
        """Split the prompt and have ``zipvl::make_static`` move it and the new token into the
        layer's fixed buffers at run time.  Returns this step's kernel args (over the split,
        which only lives in this step: nothing of it is kept on the layer)."""
        split = self._take_split(key_states)
        args = self._segment_args(split.hi, split.lo,
                                  torch.cat([split.res_k, key_states], dim=-2),
                                  torch.cat([split.res_v, value_states], dim=-2), None,
                                  split.span.shape[-1] + key_states.shape[-2], split.evicted)
        self.mark = kv_static.make_static(self.owner.token, self.layer_idx, *args)
        self.moving = True
        return args

    def get_seq_length(self) -> int:
        if self.static is not None:  # a device tensor, as transformers' StaticLayer returns
            return self.static.length[0]
        return 0 if self.span is None else self.span.shape[-1]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.static is not None:
            return self.static.max_len, 0
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1 if self.owner.capacity is None else self.owner.capacity

    def reset(self) -> None:
        self.mark = None
        self.hi = self.lo = self.res_k = self.res_v = self.span = None
        self.split = self.evicted = self.moving = False
        self.static = None
        self.owner.drop_delivery(self.layer_idx)
        self.owner.adopted.pop(self.layer_idx, None)
        self.owner.prompts.pop(self.layer_idx, None)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(
            "ZipVLCache does not support beam search (reorder_cache): use greedy decoding or "
            "sampling (num_beams=1)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("ZipVLCache cannot be cropped (assisted/speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("ZipVLCache does not support expanding a filled cache's batch")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("ZipVLCache does not support selecting batch rows")

    # ---- ZipVL ----

    def kernel_args(self) -> tuple:
        """Arguments of ``zipvl::cache_kv`` / ``zipvl::decode_attention`` (after q, mask, scale)."""
        st = self.static
        if st is not None:
            return self._segment_args(st.hi, st.lo, st.ring_k, st.ring_v, st.ring_pos,
                                      st.max_len, st.evicted)
        return self._segment_args(self.hi, self.lo, self.res_k, self.res_v, None,
                                  self.span.shape[-1], self.evicted)

    def _segment_args(self, hi, lo, res_k, res_v, res_pos, length, evicted) -> tuple:
        """``kernel_args()`` of these pools (``lo`` may be None) and residual window."""
        c = self.config
        lo_tensors = lo.tensors() if lo is not None else (None,) * 7
        return (*hi.tensors(), *lo_tensors, res_k, res_v, res_pos, c.high_bits,
                c.low_bits if lo is not None else 0, c.group_size, self.vgroup, length, evicted)

    def _take_split(self, key_states) -> kv_split.Split:
        """The split the prefill handed over, or a uniform one of the prompt copy the cache
        holds (reported to ``stats()``); ``key_states``: this step's, [B, Hkv, 1, d]."""
        c = self.config
        if self.owner._delivery is not None:   # only where the prefill's last hand-over was
            _finish_outside_graph(self.owner)   # not its last layer's (see ``deliver``)
        split = self.owner.adopted.pop(self.layer_idx, None)
        held = self.owner.prompts.pop(self.layer_idx, None)
        if split is None or split.res_k.shape[:2] != key_states.shape[:2]:
            if held is None:
                raise RuntimeError(
                    f"ZipVLCache layer {self.layer_idx}: neither a prefill selection nor the "
                    "prompt reached the cache (zipvl::mark_prompt did not run)")
            keys, values = held
            split = kv_split.split_uniform(keys, values, high_bits=c.high_bits,
                                           residual_length=c.residual_length,
                                           group_size=c.group_size, vgroup=self.vgroup)
            self.mark = handoff.note_uniform_split(self.owner.token, self.layer_idx,
                                                   keys.shape[-2])
        return split

    def install(self, split: kv_split.Split) -> None:
        """Make ``split`` this layer's storage."""
        self.hi, self.lo, self.evicted = split.hi, split.lo, split.evicted
        self.res_k, self.res_v, self.span = split.res_k, split.res_v, split.span
        self.split = True

    def _flush_group(self) -> None:
        """Quantize the oldest ``group_size`` residual tokens into the high-bit pool."""
        G, r, L = self.config.group_size, self.res_k.shape[-2], self.span.shape[-1]
        B = self.res_k.shape[0]
        pos = torch.arange(G, device=self.res_k.device)[None, :].expand(B, G) + (L - r)
        self.hi = kv_pool.append_group(self.hi, self.res_k[:, :, :G], self.res_v[:, :, :G], pos)
        # contiguous: a slice's strides would differ from the next step's cat (a recompile)
        self.res_k = self.res_k[:, :, G:].contiguous()
        self.res_v = self.res_v[:, :, G:].contiguous()

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor this layer holds."""
        out = [self.res_k, self.res_v, *self.owner.prompts.get(self.layer_idx, ())]
        for pool in (self.hi, self.lo):
            if pool is not None:
                out += list(pool.tensors())
        if self.static is not None:
            out += self.static.tensors()
        return [t for t in out if t is not None]


@torch._dynamo.disable
def _finish_outside_graph(cache: "ZipVLCache") -> None:
    """``cache.finish_delivery()`` run eagerly: it reads the pool sizes on the host and sizes
    the pools, which a traced decode step cannot."""
    cache.finish_delivery()


class ZipVLCache(Cache):
    """Mixed-precision KV cache driven by ZipVL's prefill importance (``ZipVLConfig``'s
    ``high_bits``, ``low_bits``, ``group_size``, ``residual_length``).

    Works with ``generate()`` (greedy or sampling; beam search raises), batches with padding and
    GQA.  ``memory_bytes()`` is the device storage it holds, ``dense_bytes()`` what a 16-bit
    cache of the same tokens holds."""

    def __init__(self, config: ZipVLConfig | None = None, *, max_cache_len: int | None = None,
                 **fields):
        config = config or ZipVLConfig()
        self.config = config.replace(**fields) if fields else config
        if max_cache_len is not None and (isinstance(max_cache_len, bool)
                                          or not isinstance(max_cache_len, int)
                                          or max_cache_len < 2):
            raise ValueError(f"max_cache_len must be None (growing storage) or an int >= 2 "
                             f"(prompt + generated tokens), got {max_cache_len!r}")
        self.capacity = max_cache_len  # positions a static cache holds (None: growing)
        super().__init__(layers=[])
        self.token = torch.zeros(1)  # names this cache to the prefill kernels (handoff)
        self.adopted: dict[int, kv_split.Split] = {}  # splits handed over, not yet adopted
        # prompt copies (mark_prompt), until a selection is handed over or a decode step splits
        self.prompts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # the latest selection handed over by a graph-capturable kernel (``deliver``), whose
        # pool sizes are on their way to the host: (layer, plan, host counts, event, site)
        self._delivery: tuple | None = None
        self._stats_uids: dict[int, int] = {}
        handoff.register(self.token, self)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(ZipVLLayer(self, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states)

    # ---- handoff.Receiver: called by the sparse prefill kernels at run time ----

    def hold_prompt(self, layer: int, keys, values) -> None:
        """``zipvl::mark_prompt`` at run time: the prompt copy of ``layer``."""
        self.drop_delivery(layer)   # a delivery of an earlier prompt of this layer is stale
        self.prompts[layer] = (keys, values)

    def install_static(self, layer: int, hi, lo, res_k, res_v, length: int,
                       evicted: bool) -> None:
        """``zipvl::make_static`` at run time: layer ``layer``'s segments into fixed buffers."""
        self.layers[layer].static = kv_static.build(
            hi, lo, res_k, res_v, length, self.capacity, self.config.residual_length,
            evicted)

    def plan(self, layer: int, keys, kept_idx, budget) -> kv_split.Plan:
        return kv_split.plan(keys.shape[-2], kept_idx, budget, self.config.residual_length)

    def adopt(self, layer: int, keys, values, plan, counts, site: str) -> None:
        c = self.config
        vgroup = min(c.group_size, values.shape[-1])
        split = kv_split.split_by_importance(keys, values, plan, counts, high_bits=c.high_bits,
                                             low_bits=c.low_bits, group_size=c.group_size,
                                             vgroup=vgroup)
        self.adopted[layer] = split
        self.prompts.pop(layer, None)  # the pools replace the unquantized copy
        r = split.res_k.shape[-2]
        low = "evicted" if c.low_bits == 0 else f"{c.low_bits}-bit"
        self._report(layer, keys.shape[-2], [h + r for h in split.hi_counts],
                     [h + lo + r for h, lo in zip(split.hi_counts, split.lo_counts)],
                     f"importance of {site}; the others {low}")

    def deliver(self, layer: int, keys, values, plan, site: str) -> None:
        """``zipvl::deliver_selection`` at run time (the graph-capturable prefill kernel, which
        has no host read of its own): the pool sizes ``plan.counts`` start an asynchronous copy
        to the host, and the layer's pools are built from its prompt copy at the next delivery
        (the next layer's, by when the copy has landed while the GPU ran this layer's attention
        and MLP) or when the cache is next read (``finish_delivery``).  So the hand-over never
        makes the host wait for the work it has just queued; the price is that one layer's
        prompt copy is held one layer longer.  ``keys``/``values`` [B, Hkv, n, d]: the prompt
        K/V the kernel saw (cloned only when the cache holds no copy of them).

        The last layer the cache has (``len(self.layers) - 1``) is built at once: no layer
        follows to hide the wait behind, and its pools must exist before the first decode
        step is traced.  A delivery still pending then (a prefill whose last layers hand nothing
        over) is completed by that step outside its graph (one graph break, that step only)."""
        self.finish_delivery()
        if layer >= len(self.layers) - 1:
            self.adopt(layer, keys, values, plan, plan.counts.tolist(), site)
            return
        if layer not in self.prompts:
            self.prompts[layer] = (keys.clone(), values.clone())
        counts = plan.counts
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=counts.is_cuda)
        host.copy_(counts, non_blocking=True)
        event = None
        if counts.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(counts.device))
        self._delivery = (layer, plan, host, event, site)

    def finish_delivery(self) -> None:
        """Build the pools of the pending ``deliver`` (waits for its pool sizes to reach the
        host; nothing to do when none is pending)."""
        if self._delivery is None:
            return
        layer, plan, host, event, site = self._delivery
        self._delivery = None
        if event is not None:
            event.synchronize()
        keys, values = self.prompts[layer]
        self.adopt(layer, keys, values, plan, host.tolist(), site)

    def drop_delivery(self, layer: int) -> None:
        """Forget a pending ``deliver`` of ``layer`` (its prompt is being replaced)."""
        if self._delivery is not None and self._delivery[0] == layer:
            self._delivery = None

    def report_uniform(self, layer: int, n: int) -> None:
        reason = ("no prefill importance (prompt not run through a zipvl sparse prefill): "
                  f"every token at {self.config.high_bits}-bit")
        logger.info("zipvl: layer %d cache: %s", layer, reason)
        self._report(layer, n, [], [], reason)

    def _report(self, layer, n, kept, valid, reason) -> None:
        """One stats row per layer: which split its prompt got."""
        c = self.config
        if layer not in self._stats_uids:
            self._stats_uids[layer] = stats.register(stats.SiteRecord(
                site=f"layers.{layer} kv-cache", phase="kv-cache", path="", kernel="zipvl"))
        stats.update(self._stats_uids[layer], n, kept, valid,
                     path=f"kv {c.high_bits}/{c.low_bits}", reason=reason)

    def capacity_exceeded(self) -> bool:
        """With ``max_cache_len``: whether decoding ran past it in some layer (tokens that left
        the residual window were then dropped; reads a device flag, one host sync).  Logged as
        an error when True."""
        over = any(bool(layer.static.overflow) for layer in self.layers
                   if layer.static is not None)
        if over:
            logger.error("zipvl: ZipVLCache decoded past max_cache_len=%d: tokens were dropped; "
                         "give a max_cache_len >= prompt + max_new_tokens", self.capacity)
        return over

    # ---- memory ----

    def memory_bytes(self) -> int:
        """Bytes of device storage this cache holds (packed codes, scales, middle values, slot
        positions, residual window, prompt copies not yet split), counting each storage once."""
        self.finish_delivery()
        seen, total = set(), 0
        tensors = [t for layer in self.layers for t in layer.tensors()]
        tensors += [t for split in self.adopted.values() for t in split.tensors()]
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    def dense_bytes(self) -> int:
        """Bytes a 16-bit (bf16/fp16) cache of the same tokens would hold."""
        self.finish_delivery()
        total = 0
        for layer in self.layers:
            i = layer.layer_idx
            ref = None  # a tensor [B, Hkv, ., d] of the layer
            if layer.static is not None:
                ref = layer.static.ring_k
            elif layer.split:
                ref = layer.res_k
            elif i in self.adopted:
                ref = self.adopted[i].res_k
            elif i in self.prompts:
                ref = self.prompts[i][0]
            if ref is not None:
                B, Hkv, _, d = ref.shape
                total += B * Hkv * int(layer.get_seq_length()) * 2 * d * 2
        return total
