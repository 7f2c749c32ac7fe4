"""`train.compile`: the segmenter compiled in place with torch.compile, falling back to eager (one warning) wherever
compiling fails."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _reason(err: BaseException) -> str:
    """The root cause of a compile error in one line (dynamo wraps the backend's error in its own)."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def compile_model(model: nn.Module, *, backend: str) -> nn.Module:
    """Compile `model`'s forward in place and return it.

    `nn.Module.compile` keeps the module itself: its parameters, buffers and state-dict keys stay its own (no
    `_orig_mod.` prefix), so checkpoints read as an uncompiled model's and the caller wraps it (DDP) as before. Only
    `model(...)` runs compiled; other methods (`encode`) run eager. Compiling happens at the first call and again for
    what the first graph does not cover (eval mode, no_grad, another input size). Shapes are static: training crops
    have one size and evaluation a few, and torch 2.13's dynamic-shape graphs of this model fail to compile (its
    scalar pass lacks sympy's `python_mod`); past dynamo's recompile limit (8) a new size runs eager.

    If a call raises, one warning names the cause, the model runs eager from then on, and the call is run again
    eagerly from the random state of before it: a compile failure changes no result of the run (a real error in the
    model raises again).
    """
    model.compile(backend=backend, dynamic=False)
    compiled = model._compiled_call_impl  # what nn.Module.compile installed: __call__ runs it instead of forward

    def call(*args, **kwargs):
        state = _rng_state()
        try:
            return compiled(*args, **kwargs)
        except Exception as err:  # an inductor or dynamo failure (no C compiler, an unsupported op, ...)
            model._compiled_call_impl = None  # eager from now on
            warnings.warn(
                f"train.compile: torch.compile ({backend}) failed, running eager: {_reason(err)}", stacklevel=2
            )
            _set_rng_state(state)
            return model._call_impl(*args, **kwargs)

    model._compiled_call_impl = call
    return model


def is_compiled(model: nn.Module) -> bool:
    """Whether `model(...)` currently runs through `compile_model`'s compiled path (False after a fallback)."""
    return model._compiled_call_impl is not None
