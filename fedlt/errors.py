"""The exception types that the command line turns into a message without a server traceback, and the hint
their messages give for a misspelt name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FedLTError(Exception):
    """A user-facing error: bad config, missing data, impossible partition.

    `python -m fedlt.simulate` prints ``error: <message>`` and exits with status 2,
    with no traceback. Everything else is a bug and keeps its traceback.
    """


class ClientFailure(RuntimeError):
    """A client raised, and the run tolerates no more failures (the message names the partition and holds the
    client's traceback), or every client of a round failed (one line: nothing to aggregate).

    `python -m fedlt.simulate` prints ``error: <message>`` and exits with status 1.
    """


def did_you_mean(word: str, known: Iterable[str], prefix: str = "", suffix: str = "") -> str:
    """`` (did you mean 'train.lr'?)`` for the closest of ``known`` to a misspelt ``word`` (difflib's ratio ≥ 0.75),
    written between ``prefix`` and ``suffix``; else ''."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.75)
    return f" (did you mean {prefix + close[0] + suffix!r}?)" if close else ""
