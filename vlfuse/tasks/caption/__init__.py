"""Image captioning."""
from .model import CaptionModel, CaptionModelConfig
from .pipeline import Captioner, CaptionResult
from .rerank import CaptionDecodeConfig

__all__ = ["CaptionDecodeConfig", "CaptionModel", "CaptionModelConfig", "Captioner", "CaptionResult"]
