"""The ``zipvl`` torch.compile backend: zipvl passes, then Inductor.

``torch.compile(m, backend="zipvl")`` resolves to ``zipvl_backend`` through the
``torch_dynamo_backends`` entry point; ``backend(tau=0.95)`` returns a configured backend.
``options`` may carry ZipVLConfig fields (e.g. ``options={"tau": 0.95}``); the remaining keys are
Inductor config patches, as with the inductor backend.
"""
from __future__ import annotations

import functools
import logging

import torch

from .passes import PassManager, SiteDecision  # noqa: F401  (re-exported for users)
from .config import ZipVLConfig
from .runtime import stats

logger = logging.getLogger("zipvl_compile")

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def resolve_kernel(kernel: str, mode: str | None) -> str:
    if kernel != "auto":
        return kernel
    return "flex" if mode in CUDA_GRAPH_MODES else "sdpa"


class ZipVLBackend:
    """A configured zipvl backend (callable as a torch.compile backend)."""

    def __init__(self, config: ZipVLConfig | None = None, *, inductor: bool = True):
        self.config = config or ZipVLConfig()
        self.inductor = inductor  # False: run the rewritten graph eagerly (debugging)
        self.decisions: list[SiteDecision] = []  # every site of every graph compiled so far

    def __repr__(self) -> str:
        return f"ZipVLBackend({self.config})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, *, mode=None, options=None):
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        config, patches = self.config, {}
        if options:
            fields = {k: v for k, v in options.items() if k in ZipVLConfig.field_names()}
            config = config.replace(**fields)
            patches = {k: v for k, v in options.items() if k not in fields}
        if mode not in (None, "default"):
            patches = {**list_mode_options(mode), **patches}
        settings = config.prefill_settings()
        settings.update(kernel=resolve_kernel(config.kernel, mode), keep_all=config.keeps_everything)
        decisions = PassManager(settings)(gm)
        self.decisions.extend(decisions)
        logger.debug("zipvl: graph with %d attention sites, %d sparse", len(decisions),
                     sum(d.sparse for d in decisions))
        compiled = (compile_fx(gm, example_inputs, config_patches=patches or None)
                    if self.inductor else gm.forward)
        return _reporting(compiled, tuple(d.uid for d in decisions))


def _reporting(compiled, uids: tuple[int, ...]):
    """``compiled`` telling ``stats`` that its sites ran, so that the sites decided at compile
    time show in ``stats()`` after a ``reset_stats()``.  Dynamo calls a backend's result with
    the graph's inputs as positional arguments; the attributes AOTAutograd attaches are kept,
    except ``_boxed_call``, which it copies from an inner function and which does not hold for
    the callable Dynamo receives."""
    if not uids:
        return compiled

    @functools.wraps(compiled)
    def run(*args, **kwargs):
        stats.touch(uids)
        return compiled(*args, **kwargs)
    run.__dict__.pop("_boxed_call", None)
    return run


def backend(config: ZipVLConfig | None = None, *, inductor: bool = True,
            **fields) -> ZipVLBackend:
    """A zipvl backend with ``config`` (default ``ZipVLConfig()``) updated by ``fields``.

    ``inductor=False`` applies the passes but runs the rewritten graph eagerly (no Inductor):
    slower, useful to debug a model's attention sites quickly."""
    config = config or ZipVLConfig()
    return ZipVLBackend(config.replace(**fields) if fields else config, inductor=inductor)


def zipvl_backend(gm, example_inputs, *, mode=None, options=None):
    """Entry point ``zipvl``: the backend with default settings."""
    return ZipVLBackend()(gm, example_inputs, mode=mode, options=options)
