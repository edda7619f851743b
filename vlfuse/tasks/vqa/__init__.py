"""Visual question answering."""
from .model import VQAModel, VQAModelConfig
from .pipeline import QuestionAnswerer, VQAAnswer

__all__ = ["VQAModel", "VQAModelConfig", "QuestionAnswerer", "VQAAnswer"]
