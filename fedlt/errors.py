"""The exception types that the command line turns into a message without a server traceback."""


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
