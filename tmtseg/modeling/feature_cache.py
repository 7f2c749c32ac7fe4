"""Frozen-ViT outputs kept on disk between evaluations (`infer.feature_cache`).

A benchmark scores the same target images, window by window, through the same frozen ViT for every method whose ViT
stays frozen (all but LoRA here) and every seed: on the vessels pair the ViT is ~85% of an evaluation's time. The
cache maps (the ViT's weights and structure, the autocast state, the exact input window) to the ViT's output tokens,
so the result is the same as computing them (bit for bit on the same machine and build). It is used only where
nothing can differ: in eval mode, without gradients and without a forward hook on the ViT or any of its layers
(LoRA's updates are such hooks: `hooked`). With an attention hook (TVT's bias on the last block) it keeps the input
of the last block instead, and that block runs. A file that cannot be read is
computed again and rewritten; files are written atomically, so parallel runs can share one folder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from tmtseg.io.files import write_atomically


def hooked(module: nn.Module) -> bool:
    """Whether a forward hook may change what `module` computes: one on it or on any submodule (LoRA adds its update
    by a hook on the ViT's linear layers, with factors outside the ViT), or a global one. Its outputs are then never
    read from the cache, whose key holds only the module's own weights."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def state_version(module: nn.Module) -> tuple:
    """A key that changes whenever a parameter or buffer of `module` is replaced or modified in place (optimizer steps
    bump a tensor's version counter): what lets a comparison of its weights be made once, not at every call."""
    tensors = [*module.parameters(), *module.buffers()]
    return (id(module), *(t._version for t in tensors), *(id(t) for t in tensors))


def _digest(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return f"{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes()


class FeatureCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fingerprint: tuple[tuple, str] | None = None  # (parameter versions, digest) of the last ViT seen
        self.hits = self.misses = 0

    def fingerprint(self, vit: nn.Module) -> str:
        """The ViT's weights and structure; recomputed only when a tensor was modified in place (optimizer steps bump
        a tensor's version counter) or another module comes."""
        versions = state_version(vit)
        if self._fingerprint is None or self._fingerprint[0] != versions:
            h = hashlib.sha1(repr(vit).encode())  # the structure: widths, heads, norms, patch
            for name, t in [*vit.named_parameters(), *vit.named_buffers()]:
                h.update(name.encode())
                h.update(_digest(t))
            self._fingerprint = (versions, h.hexdigest())
        return self._fingerprint[1]

    def key(self, vit: nn.Module, x: Tensor, part: str = "out") -> str:
        h = hashlib.sha1(self.fingerprint(vit).encode())
        if part != "out":  # "out" keys are the ones written before parts existed: their files stay valid
            h.update(f"part {part}".encode())
        device = x.device.type
        h.update(f"autocast {torch.is_autocast_enabled(device)} {torch.get_autocast_dtype(device)}".encode())
        h.update(_digest(x))
        return h.hexdigest()

    def tokens(
        self, vit: nn.Module, x: Tensor, compute: Callable[[], tuple[Tensor, tuple[int, int]]], *, part: str = "out"
    ):
        """The ViT's (tokens [B, N, C], grid (h, w)) for input x: read from the cache, or computed and stored. part:
        which output of the ViT `compute` gives ("out": its final tokens; "trunk": the input of its last block)."""
        from safetensors.torch import load_file, save_file

        key = self.key(vit, x, part)
        path = self.root / key[:2] / f"{key}.safetensors"
        if path.is_file():
            try:
                stored = load_file(str(path))
                self.hits += 1
                return stored["tokens"].to(x.device), tuple(int(v) for v in stored["hw"].tolist())
            except Exception:  # unreadable (cut short by a crash, disk trouble): compute it again below
                pass
        self.misses += 1
        tokens, hw = compute()
        stored = {"tokens": tokens.detach().contiguous().cpu(), "hw": torch.tensor(hw)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, lambda tmp: save_file(stored, str(tmp)))
        except OSError:  # a full or read-only disk costs speed, never the evaluation (no temporary file is left)
            pass
        return tokens, hw
