"""Fusion modules, one file each; importing this package registers them all in ``FUSIONS``."""
from ...registry import FUSIONS
from . import (  # noqa: F401  (registration)
    bilinear,
    concat,
    cross_attention,
    elementwise,
    joint,
    mutan,  # noqa: F401  (registration; MUTAN, added for VQA)
    soft_attention,
)
from .base import Fusion, FusionOutput


def build_fusion(name: str, image_dim: int, text_dim: int, **kwargs) -> Fusion:
    """Build a registered fusion module for the given input sizes."""
    return FUSIONS.build(name, image_dim=image_dim, text_dim=text_dim, **kwargs)


__all__ = ["Fusion", "FusionOutput", "build_fusion"]
