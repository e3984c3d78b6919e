"""User-facing errors: the CLI prints them as one paragraph and exits 2."""

from __future__ import annotations

__all__ = ["EmptySplit", "InterruptedAgain", "SampleError", "VqgenError"]


class VqgenError(Exception):
    """Bad input from the user (a file, field or value), described in the message."""


class EmptySplit(VqgenError):
    """A data set's split (``split: val``) that holds no sample: the data has no held-out
    part. Validation, ``best/`` and evaluation then go without; the message says how to
    give the data one."""


class SampleError(VqgenError):
    """A bad value in one sample of a batch: ``key`` of sample ``index`` ``problem``.

    Raised by conditioners, which see batches, not files; a caller that knows where
    the sample came from (a data set, a ``--cond`` file) names it with :meth:`at`.
    """

    def __init__(self, key: str, index: int, problem: str) -> None:
        super().__init__(f"{key} of sample {index} {problem}")
        self.key, self.index, self.problem = key, index, problem

    def at(self, source: str) -> VqgenError:
        """The same error, naming ``source`` (a file) instead of the batch index."""
        return VqgenError(f"{source}: {self.key} {self.problem}")


class InterruptedAgain(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while training stops gracefully: the step or checkpoint
    in progress is abandoned; the message says what is on disk and how to go on."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.message, self.exit_code = message, 128 + signum
