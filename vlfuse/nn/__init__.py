"""Parts: plain nn.Modules shared by every task, each registered by name in ``vlfuse.registry``. Importing this
package registers them all (vision and text encoders, fusion modules, decoders, heads, concept heads)."""
from . import concepts, decoders, fusion, heads, text, vision  # noqa: F401  (registration)
