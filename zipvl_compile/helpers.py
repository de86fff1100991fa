"""One-line compilation of the part of a transformers model that prefill runs through.

``torch.compile(model).generate(...)`` compiles nothing: ``generate`` is not ``forward``.
``model.compile(backend="zipvl")`` works (generate calls the compiled forward), but then Dynamo
also captures the vision tower and the input merging, with many graph breaks (about 24 for
Qwen2-VL).  Compiling only the language model gives one graph per phase.
"""
from __future__ import annotations

import inspect
import weakref

import torch

from .backend import ZipVLBackend, backend as make_backend
from .config import ZipVLConfig

RECOMPILE_LIMIT = 32  # raised process-wide by compile_language_model (see there)
_GENERATE_COMPILE_DISABLED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_LM_ATTRS = ("language_model", "model.language_model", "model.text_model", "text_model")


def find_language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack of a VLM (``model.model.language_model`` for Qwen2-VL / LLaVA in
    transformers 5), else ``get_decoder()``, else the model itself."""
    for path in _LM_ATTRS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.Module):
            return obj
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    return decoder if isinstance(decoder, torch.nn.Module) else model


def compile_language_model(model: torch.nn.Module, config: ZipVLConfig | None = None, *,
                           mode: str | None = None, dynamic: bool | None = None,
                           **fields) -> ZipVLBackend:
    """Compile the language model of ``model`` in place with the zipvl backend.

    Returns the backend (its ``decisions`` list every site seen).  ``model.generate()`` then runs
    sparse prefill with no further change."""
    zipvl = make_backend(config, **fields)
    kwargs = {"backend": zipvl, "dynamic": dynamic}
    if mode is not None:
        kwargs["mode"] = mode
    # transformers wraps every model's forward in one shared decorator function, so Dynamo's
    # per-function recompile limit (8) would be shared by every model compiled in the process
    # and later graphs would silently run eagerly.  Isolate this compilation where supported.
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters:
        kwargs["isolate_recompiles"] = True
    # With a ZipVLCache, each cache configuration compiles about six graphs (prefill with and
    # without a padding mask, the step adopting the prompt split, steady steps static then
    # dynamic, the step that quantizes a full group): the default limit of 8 is reached by
    # the second configuration, after which Dynamo silently runs the forward eagerly.
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    # With a cache that has static shapes (ZipVLCache(max_cache_len=...), StaticCache),
    # generate() would also wrap the whole model in its own torch.compile (Inductor, not
    # zipvl) for decode steps: the language model compiled here already covers them.
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "disable_compile", None) is None:
        generation.disable_compile = True
        _GENERATE_COMPILE_DISABLED.add(model)
    find_language_model(model).compile(**kwargs)
    return zipvl


def uncompile_language_model(model: torch.nn.Module) -> None:
    """Undo ``compile_language_model``: the language model runs eagerly again (its compiled
    graphs stay in Dynamo's cache until ``torch._dynamo.reset()``)."""
    find_language_model(model)._compiled_call_impl = None
    if model in _GENERATE_COMPILE_DISABLED:
        model.generation_config.disable_compile = None
        _GENERATE_COMPILE_DISABLED.discard(model)


def cache_kwarg(model: torch.nn.Module, cache) -> dict:
    """``{name: cache}`` with the keyword a transformers ``model`` (its ``forward`` and
    ``generate``) takes its KV cache by: ``cache`` from transformers 5.24 on, ``past_key_values``
    before (5.24 still accepts the old name, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}
