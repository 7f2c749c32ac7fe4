"""The ONNX export's one decomposition: torch.export's program decomposed here, once, to what the ONNX exporter
translates, and the exporter told to take it as it is. A decomposition re-traces the whole graph with symbolic sizes
(about a fifth of an export's time, profiled); the exporter's own pass would be a second one. The same graph node for
node; the test suite's msdeform + TMT export took 79 s of CPU instead of 94 (one run each, side by side, machine
loaded)."""

from __future__ import annotations

import contextlib

import torch


def decompose_for_onnx(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program decomposed once, to core ATen and further to the ops the ONNX exporter's registry implements (the
    table its own pass uses), here rather than under its size-oblivious shape checks (tools/export.py's export_graph
    says why)."""
    from torch.onnx._internal.exporter import _decomp, _registration

    onnx_ops = set(_decomp.get_onnx_implemented_overloads(_registration.ONNXRegistry.from_torchlib()))
    table = torch.export.default_decompositions()  # to core ATen, as before ...
    for op, fn in _decomp.create_onnx_friendly_decomposition_table(onnx_ops).items():
        if op not in table:  # ... and the core ATen ops ONNX lacks (squeeze.dims, ...) further, in the same pass
            table[op] = fn
    return program.run_decompositions(table)


@contextlib.contextmanager
def exporter_takes_the_program_as_decomposed():
    """torch.onnx.export's preparation of an ExportedProgram without its decomposition (done by decompose_for_onnx):
    only its type-promotion and assertion-removal passes. Private API of the pinned torch (pyproject), hence the
    check: another torch, or another layout, keeps the exporter's own preparation (one more decomposition, slower,
    the same graph)."""
    from torch.onnx._internal.exporter import _core, _fx_passes

    original = getattr(_core, "_prepare_exported_program_for_export", None)
    if original is None or not hasattr(_fx_passes, "insert_type_promotion_nodes"):
        yield
        return

    def prepare(exported_program, *, registry):  # noqa: ARG001 - the exporter's signature
        module = exported_program.graph_module  # (without the size-oblivious checks: see export_graph)
        _fx_passes.insert_type_promotion_nodes(module)
        exported_program._graph_module = _fx_passes.remove_assertion_nodes(module)
        return exported_program

    _core._prepare_exported_program_for_export = prepare
    try:
        yield
    finally:
        _core._prepare_exported_program_for_export = original
