"""Image–text retrieval and the image index built on it."""
from .index import ImageIndex, SearchHit
from .model import RetrievalModel, RetrievalModelConfig
from .pipeline import RetrievalImageTower, Retriever

__all__ = ["ImageIndex", "SearchHit", "RetrievalModel", "RetrievalModelConfig", "RetrievalImageTower", "Retriever"]
