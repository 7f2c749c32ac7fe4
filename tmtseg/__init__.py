"""tmtseg: cross-domain semantic segmentation with the Transferable Mask Transformer (TMT).

The Python API (tmtseg/api.py), loaded on first use so that `import tmtseg` stays light (no torch until a name is
used): `tmtseg.load(path)` -> a `SegmentationModel` (predict, evaluate, save_pretrained, to), `tmtseg.adapt_model(...)`.

Shape vocabulary, used in every ``# [..]`` comment of the package:
B batch, Q queries, K classes, C channels, H x W spatial, N tokens, R regions, h heads,
P pixels (H*W of a feature map).
"""

__version__ = "0.1.0"

# adapt_model, not adapt: importing the subpackage tmtseg.adapt sets that attribute and would hide the function
_API = ("load", "adapt_model", "SegmentationModel")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from tmtseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'tmtseg' has no attribute {name!r}")
