"""cxr: multi-label chest X-ray disease detection on NIH ChestX-ray14, in plain PyTorch."""

from cxr.labels import FINDINGS, NO_FINDING, NUM_CLASSES

__all__ = ["FINDINGS", "NO_FINDING", "NUM_CLASSES"]
__version__ = "0.1.0"
