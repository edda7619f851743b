"""Tagging: the concepts a photo shows, from the frozen backbone's own ImageNet classifier."""
from .pipeline import Tagger

__all__ = ["Tagger"]
