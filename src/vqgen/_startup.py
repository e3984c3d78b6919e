"""Start-up of the ``vqgen`` command: a Ctrl-C while it imports torch and friends exits
130 with one line (nothing has been read or written yet), not a traceback through the
imports. Imported first by ``vqgen/__init__.py``; does nothing for library users (their
process is not the command). :func:`vqgen.cli.main` puts Python's handler back first
thing."""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__: list[str] = []


def _quiet_start_up_interrupt(signum: int, frame: object) -> None:
    """Exit at once: nothing has been read or written yet, and an exception raised here
    could land in an import's bare ``except`` and be swallowed (measured: the command then
    ran on and exited 0)."""
    print("\nvqgen: interrupted while starting; nothing was done", file=sys.stderr)
    sys.stderr.flush()
    os._exit(130)


def _started_as_cli() -> bool:
    """Whether this process is the ``vqgen`` command (its script or ``python -m vqgen``)."""
    argv = list(getattr(sys, "orig_argv", []))
    script = argv[1] if len(argv) > 1 else ""
    return script.endswith(("/vqgen", "\\vqgen", "vqgen.exe")) or argv[1:3] == ["-m", "vqgen"]


if _started_as_cli() and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _quiet_start_up_interrupt)
