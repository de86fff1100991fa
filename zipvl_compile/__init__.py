"""zipvl-compile: ZipVL sparse prefill for LVLMs as a torch.compile backend.

    model.compile(backend="zipvl")                          # defaults
    model.compile(backend=zipvl_compile.backend(tau=0.95))  # configured
    print(zipvl_compile.format_stats())

    cache = zipvl_compile.ZipVLCache(zipvl_compile.ZipVLConfig(high_bits=4, low_bits=2))
    model.generate(**inputs, past_key_values=cache)         # mixed-precision KV cache

    zipvl_compile.compile_language_model(model, mode="reduce-overhead")  # CUDA graphs:
    cache = zipvl_compile.ZipVLCache(max_cache_len=prompt_len + max_new_tokens)
"""
from . import reference
from .backend import ZipVLBackend, backend, zipvl_backend
from .config import ZipVLConfig
from .helpers import compile_language_model, uncompile_language_model
from .runtime.stats import SiteRecord, format_stats, reset as reset_stats, stats

__all__ = ["ZipVLConfig", "ZipVLCache", "ZipVLBackend", "backend", "zipvl_backend", "reference",
           "stats", "format_stats", "reset_stats", "SiteRecord", "compile_language_model",
           "uncompile_language_model"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "ZipVLCache":  # needs transformers (the ``hf`` extra): imported on first use
        from .cache import ZipVLCache
        return ZipVLCache
    raise AttributeError(f"module 'zipvl_compile' has no attribute {name!r}")
