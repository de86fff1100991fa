"""Per-site statistics: what each attention site did in the most recent forward.

Sites are registered at compile time (static facts: name, phase, path, reason).  Sparse sites
update their budgets at run time; the host-read kernel stores plain ints, the graph-capturable
kernel stores references to device tensors (no sync) that are read only when ``stats()`` is
called.  Sites decided at compile time (dense, fused decode) report through ``touch``, which the
backend's wrapper of each compiled graph calls when the graph runs.  Dense fallbacks are logged
once per (site, phase, reason).
"""
from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field

import torch

from . import handoff

logger = logging.getLogger("zipvl_compile")


@dataclass
class SiteRecord:
    """One attention site.  ``kept``/``valid`` hold one entry per batch element (empty until a
    sparse site has run); ``kept_ratio`` is the mean of kept/valid over the batch."""

    site: str
    phase: str
    path: str
    reason: str = ""
    module: str = ""
    kernel: str = ""
    seq_len: int | None = None
    kept: list[int] = field(default_factory=list)
    valid: list[int] = field(default_factory=list)

    @property
    def kept_ratio(self) -> float | None:
        if not self.kept:
            return None
        return sum(k / max(v, 1) for k, v in zip(self.kept, self.valid)) / len(self.kept)


class _Site:
    def __init__(self, uid: int, record: SiteRecord):
        self.uid, self.record = uid, record
        self.pending: torch.Tensor | None = None  # [2, B] host copy of (budget, n_valid)
        self.touched = next(_clock)
        self.static = record.path != "sparse"  # decided at compile time: reports via touch()


_clock = itertools.count()
_lock = threading.Lock()
_sites: dict[int, _Site] = {}
_reported: set[tuple] = set()
_epoch = -1  # clock value at the last reset: older records are hidden


def register(record: SiteRecord) -> int:
    """Register a site found by the passes; returns its id (used by the runtime ops)."""
    with _lock:
        uid = len(_sites)
        _sites[uid] = _Site(uid, record)
    if record.path == "dense":
        report_dense(record)
    return uid


def report_dense(record: SiteRecord) -> None:
    key = (record.site, record.phase, record.reason)
    if key in _reported:
        return
    _reported.add(key)
    expected = (record.phase == "decode"
                or record.reason.startswith(("non-causal", "prompt shorter", "among the first")))
    (logger.info if expected else logger.warning)(
        "zipvl: %s (%s) keeps dense attention: %s", record.site, record.phase, record.reason)


def note_slow_kernel(uid: int, kernel: str, reason: str) -> None:
    """A site's kernel fell back to a slower exact implementation at run time: the record says
    which and why; logged once per (site, reason).  ``uid`` -1 (no site): logged only."""
    key = (uid, kernel, reason)
    if key in _reported:
        return
    _reported.add(key)
    name = "an attention call"
    if uid in _sites:
        rec = _sites[uid].record
        rec.kernel, rec.reason, name = kernel, reason, rec.site
    logger.warning("zipvl: %s runs the %s kernel: %s", name, kernel, reason)


def touch(uids: tuple[int, ...]) -> None:
    """The compiled graph holding these sites runs: its sites decided at compile time (dense,
    fused decode) count as reported now (sparse sites report from their kernels)."""
    now = next(_clock)
    for uid in uids:
        site = _sites[uid]
        if site.static:
            site.touched = now


def site_name(uid: int) -> str:
    return _sites[uid].record.site


def update(uid: int, seq_len: int, kept: list[int], valid: list[int], path: str = "sparse",
           reason: str = "") -> None:
    """Runtime update with host values (host-read kernel)."""
    site = _sites[uid]
    rec = site.record
    rec.seq_len, rec.kept, rec.valid, rec.path, rec.reason = seq_len, kept, valid, path, reason
    site.pending, site.touched = None, next(_clock)
    if path == "dense":
        report_dense(rec)


def update_lazy(uid: int, seq_len: int, budget: torch.Tensor, n_valid: torch.Tensor) -> None:
    """Runtime update without a sync (graph-capturable kernel): an asynchronous copy of the
    budgets into a host buffer this site owns, read when ``stats()`` is called.  The copy is
    recorded into CUDA graphs and replays with them; no device tensor is kept alive."""
    site = _sites[uid]
    values = torch.stack([budget, n_valid])
    host = site.pending
    if host is None or host.shape != values.shape:
        pin = values.is_cuda and torch.cuda.is_available()
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=pin)
    host.copy_(values, non_blocking=True)
    site.record.seq_len = seq_len
    site.pending, site.touched = host, next(_clock)


def stats() -> list[SiteRecord]:
    """Latest record per (site, phase), in the order the sites were first found (pending
    hand-overs to KV caches are completed first: their rows say which split was applied)."""
    handoff.finish_deliveries()
    latest: dict[tuple, _Site] = {}
    first_seen: dict[tuple, int] = {}
    for site in _sites.values():
        if site.touched <= _epoch:
            continue
        key = (site.record.site, site.record.phase)
        first_seen.setdefault(key, site.uid)
        if key not in latest or site.touched > latest[key].touched:
            latest[key] = site
    if torch.cuda.is_available() and any(s.pending is not None for s in latest.values()):
        torch.cuda.synchronize()  # pending host copies of budgets have landed
    out = []
    for key in sorted(latest, key=first_seen.__getitem__):
        site = latest[key]
        if site.pending is not None:
            site.record.kept, site.record.valid = site.pending.tolist()
        out.append(site.record)
    return out


def reset() -> None:
    """Hide every record until its site reports again (sparse sites from their kernels, sites
    decided at compile time whenever their graph runs).  Compiled graphs stay valid."""
    global _epoch
    with _lock:
        _epoch = next(_clock)
        _reported.clear()


def format_stats(records: list[SiteRecord] | None = None) -> str:
    """Render ``stats()`` as a table."""
    from tabulate import tabulate

    rows = []
    for r in stats() if records is None else records:
        ratio = r.kept_ratio
        rows.append([r.site, r.module or "-", r.phase,
                     r.seq_len if r.seq_len is not None else "-",
                     ",".join(map(str, r.kept)) or "-",
                     f"{ratio:.3f}" if ratio is not None else "-", r.path, r.kernel or "-",
                     r.reason or ""])
    return tabulate(rows, headers=["site", "module", "phase", "seq", "kept", "ratio", "path",
                                   "kernel", "reason"])
