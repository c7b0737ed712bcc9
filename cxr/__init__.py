"""cxr: multi-label chest X-ray disease detection on NIH ChestX-ray14, in plain PyTorch.

    from cxr import Classifier                       # imported on first use: `import cxr` stays light
    clf = Classifier.from_checkpoint("runs/X/best.pt")
"""

from typing import Any

from cxr.labels import FINDINGS, NO_FINDING, NUM_CLASSES

__all__ = ["FINDINGS", "NO_FINDING", "NUM_CLASSES", "Classifier", "Prediction"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Lazy access to the Python API (cxr.predict imports torch and OpenCV)."""
    if name in ("Classifier", "Prediction"):
        from cxr import predict

        return getattr(predict, name)
    raise AttributeError(f"module 'cxr' has no attribute {name!r}")
