"""The reference transformer tokenforge measures its kernels in."""

from tokenforge.models.transformer import PRESETS, Transformer, TransformerConfig

__all__ = ["PRESETS", "Transformer", "TransformerConfig"]
