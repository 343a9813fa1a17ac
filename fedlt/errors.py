"""The one exception type that the command line turns into a one-line message."""


class FedLTError(Exception):
    """A user-facing error: bad config, missing data, impossible partition.

    `python -m fedlt.simulate` prints ``error: <message>`` and exits with status 2,
    with no traceback. Everything else is a bug and keeps its traceback.
    """
