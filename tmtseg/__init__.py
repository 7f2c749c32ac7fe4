"""tmtseg: cross-domain semantic segmentation with the Transferable Mask Transformer (TMT).

Shape vocabulary, used in every ``# [..]`` comment of the package:
B batch, Q queries, K classes, C channels, H x W spatial, N tokens, R regions, h heads,
P pixels (H*W of a feature map).
"""

__version__ = "0.1.0"
