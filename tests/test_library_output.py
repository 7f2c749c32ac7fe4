"""Third-party output (issue 29): a library's log records and its C-level writes to stderr during a call are caught
and said again once each with our prefix, or dropped as noise; the CLI routes third-party log records (training too)
through its own `tmtseg: warning:` lines, once each."""

from __future__ import annotations

import logging
import os
import warnings

from tmtseg.cli import main
from tmtseg.tools.library_output import library_output


def test_library_log_records_and_c_level_stderr_are_said_once_through_warnings_and_noise_dropped(capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_output("a library call"):
            for _ in range(3):
                logging.getLogger("some.library").warning("the graph has %d unused inputs", 2)
                os.write(2, b"[W 12:00:00 native.cpp:10] a C++ note\n")
            logging.getLogger("onnxscript.optimizer").warning("Skipping constant folding for op X with 2 outputs.")
            logging.getLogger("some.library").info("below WARNING: not said")
    said = [str(w.message) for w in caught]
    assert said == [
        "a library call (some.library): the graph has 2 unused inputs",
        "a library call (stderr): [W 12:00:00 native.cpp:10] a C++ note",
    ]
    assert capfd.readouterr().err == ""  # nothing reached the real stderr; fd 2 and logging are restored after it
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


def test_the_cli_says_third_party_log_records_once_with_its_prefix(capsys, monkeypatch):
    """A command during which a library logs a warning (twice): one `tmtseg: warning:` line, never the bare text."""
    from tmtseg.cli import commands

    def noisy(args) -> int:
        for _ in range(2):
            logging.getLogger("some.library").warning("a library warning\nover two lines")
        return 0

    monkeypatch.setitem(commands.COMMANDS, "weights", noisy)
    before = list(logging.getLogger().handlers)
    assert main(["weights", "list"]) == 0
    assert capsys.readouterr().err == "tmtseg: warning: some.library: a library warning over two lines\n"
    assert logging.getLogger().handlers == before  # removed again: main() may run inside another program
