"""Models. Importing this package registers every built-in part (encoders, fusions, decoders)."""
from . import decoders, fusion, text, vision  # noqa: F401  (registration)
from . import vqa  # noqa: F401,E402  (registers the VQA classifier head)
