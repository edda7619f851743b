"""vlfuse: vision–language fusion — captioning, VQA and image–text retrieval on a plain CPU."""
from . import models  # noqa: F401  (registers the built-in parts)
from .models.captioner import Captioner, CaptionModel, CaptionModelConfig

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionModel", "CaptionModelConfig", "__version__"]
