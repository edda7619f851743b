"""Models. Importing this package registers every built-in part (encoders, fusions, decoders)."""
from . import decoders, fusion, text, vision  # noqa: F401  (registration)
