"""Image captioning."""
from .model import CaptionModel, CaptionModelConfig
from .pipeline import Captioner, CaptionResult

__all__ = ["CaptionModel", "CaptionModelConfig", "Captioner", "CaptionResult"]
