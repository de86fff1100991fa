"""FX graph passes of the zipvl backend: find attention sites, classify them, rewrite them."""
from .manager import PassManager, SiteDecision

__all__ = ["PassManager", "SiteDecision"]
