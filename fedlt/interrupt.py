"""Ctrl-C: the first one asks the run to stop after the current round / epoch, the second one aborts.

``python -m fedlt.simulate`` installs :func:`install_stop_handler`. The first SIGINT only sets a flag
(:func:`stop_requested`); the run skeleton (:func:`fedlt.run_loop.run_steps`) reads it after each step,
writes the checkpoint and raises :class:`RunInterrupted`, which the command line turns into a resume hint
and exit status 130 (128 + SIGINT, the shell's convention). A second SIGINT raises ``KeyboardInterrupt``
at once; the command line catches it too (no traceback, exit 130).

The flag is a ``threading.Event`` because under Flower's simulation engine the round loop runs in the
ServerApp's thread while the signal handler runs in the main thread.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 130  # 128 + SIGINT

_stop = threading.Event()


class RunInterrupted(Exception):
    """A run stopped on request; ``message`` says after which step and where its checkpoint is."""


def stop_requested() -> bool:
    return _stop.is_set()


def request_stop() -> None:
    _stop.set()


def clear_stop() -> None:
    _stop.clear()


def _on_sigint(signum: int, frame: object) -> None:
    if _stop.is_set():
        raise KeyboardInterrupt
    _stop.set()
    print("\nstopping after the current step (Ctrl-C again to abort at once) ...", file=sys.stderr, flush=True)


def _exit_while_starting(signum: int, frame: object) -> None:
    print("interrupted before the run started", file=sys.stderr, flush=True)
    os._exit(EXIT_INTERRUPTED)


def exit_on_sigint_while_starting() -> None:
    """Until :func:`install_stop_handler` replaces it: SIGINT ends the process at once with 130 and one line, not
    a ``KeyboardInterrupt`` traceback from whatever module was being imported (a ``--jobs`` child told to stop
    while it starts). Nothing has run yet, so there is nothing to checkpoint."""
    signal.signal(signal.SIGINT, _exit_while_starting)


def stop_handler_installed() -> bool:
    return signal.getsignal(signal.SIGINT) is _on_sigint


def install_stop_handler() -> None:
    """Make SIGINT (Ctrl-C) request a clean stop; a second SIGINT raises ``KeyboardInterrupt``."""
    signal.signal(signal.SIGINT, _on_sigint)
