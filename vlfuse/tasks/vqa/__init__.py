"""Visual question answering."""
from .model import VQAModel, VQAModelConfig
from .pipeline import AnswerEnsemble, QuestionAnswerer, VQAAnswer

__all__ = ["VQAModel", "VQAModelConfig", "QuestionAnswerer", "AnswerEnsemble", "VQAAnswer"]
