"""The `tmtseg` command line: the only place that parses arguments, prints errors and chooses exit codes.

parser.py builds the argparse parser, commands.py and data_commands.py run the commands; here errors become one line
on stderr and an exit code."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

from tmtseg.cli.commands import COMMANDS
from tmtseg.cli.parser import EPILOG
from tmtseg.cli.parser import build_parser as _parser  # also cli._parser, which tests/test_methods.py reads

__all__ = ["COMMANDS", "EPILOG", "main"]


def _one_line(err: BaseException) -> str:
    """The message of an error; one raised in a data-loader worker comes back with the worker's traceback attached."""
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    if len(lines) > 1 and any("Traceback" in ln for ln in lines):
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(ln.strip() for ln in lines)


def _say(line: str) -> None:
    """One write per line: the ranks of a DDP run share stderr, and separate writes would interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _warning_line(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    return f"tmtseg: warning: {message}\n"


class _LibraryLog(logging.Handler):
    """Third-party log records (WARNING and above; torch, onnxscript...) as our own warning lines, once each: without
    a handler, logging's last resort prints the bare message among ours."""

    def __init__(self, prog: str) -> None:
        super().__init__(logging.WARNING)
        self.prog, self.said = prog, set()

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{record.name}: {' '.join(record.getMessage().split())}"
        if line not in self.said:
            self.said.add(line)
            _say(f"{self.prog}: warning: {line}")


def main(argv: list[str] | None = None) -> int:
    """The `tmtseg` command. As a program (no argv) in a process that joined a DDP group, it ends the process itself
    once every rank has left the group (tmtseg.dist.exit_process says why); called with argv (tests, other
    programs) it returns the exit code."""
    code = _main(argv)
    if argv is None and "torch.distributed" in sys.modules:
        from tmtseg import dist

        if dist.joined():
            dist.exit_process(code)
    return code


def _main(argv: list[str] | None) -> int:
    from tmtseg.errors import Preempted, TmtsegError, TrainingError

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    # key=value overrides may stand anywhere, also after options (argparse stops at the first option otherwise)
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    args.argv = argv
    rank = int(os.environ.get("RANK", "0"))
    prog = "tmtseg" if rank == 0 else f"tmtseg[rank {rank}]"
    formatwarning = warnings.formatwarning
    library_log = _LibraryLog(prog)
    if not args.debug:
        warnings.formatwarning = _warning_line
        logging.getLogger().addHandler(library_log)
    together = False  # whether every DDP rank leaves at the same point (then they leave the group in step)
    try:
        code = COMMANDS[args.command](args)
        together = True
        return code
    except TmtsegError as err:
        together = isinstance(err, (Preempted, TrainingError))  # the training loop raises these on all ranks at once
        if args.debug:
            traceback.print_exc()
        _say(f"{prog}: error: {_one_line(err)}")
        return err.exit_code
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 130
    except Exception as err:  # an unexpected error: one line unless --debug
        if args.debug:
            traceback.print_exc()
        else:
            message = f"{type(err).__name__}: {_one_line(err)}"
            _say(f"{prog}: unexpected error: {message} (run with --debug for the traceback)")
        return 1
    finally:
        warnings.formatwarning = formatwarning  # main() may run inside another program (tests)
        logging.getLogger().removeHandler(library_log)
        if "torch.distributed" in sys.modules:
            from tmtseg import dist

            dist.cleanup(together=together)
