"""zipvl-compile: ZipVL sparse prefill for LVLMs as a torch.compile backend.

    model.compile(backend="zipvl")                          # defaults
    model.compile(backend=zipvl_compile.backend(tau=0.95))  # configured
    print(zipvl_compile.format_stats())
"""
from . import reference
from .backend import ZipVLBackend, backend, zipvl_backend
from .config import ZipVLConfig
from .helpers import compile_language_model
from .runtime.stats import SiteRecord, format_stats, reset as reset_stats, stats

__all__ = ["ZipVLConfig", "ZipVLBackend", "backend", "zipvl_backend", "reference", "stats",
           "format_stats", "reset_stats", "SiteRecord", "compile_language_model"]
__version__ = "0.1.0"
