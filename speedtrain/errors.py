"""One exception family; each subclass carries the exit code the CLI returns for it."""


class SpeedtrainError(Exception):
    """A problem the user can act on; the CLI prints its message as one line."""

    exit_code = 1


class UsageError(SpeedtrainError):
    """A flag or argument has a value speedtrain cannot use."""

    exit_code = 2


class DatasetError(SpeedtrainError):
    """The dataset is missing, malformed or empty."""

    exit_code = 3


class HardwareError(SpeedtrainError):
    """A hardware snapshot file cannot be read, or a device does not exist."""

    exit_code = 4


class TrainingError(SpeedtrainError):
    """Training could not run or finish (for example, out of memory at the smallest batch)."""

    exit_code = 5


class RankOutOfMemory(TrainingError):
    """This rank ran out of memory; its record in the stage folder makes every rank restart one batch smaller."""


class PeerFailed(TrainingError):
    """Another rank failed first (its own message says why); this one stops without repeating it."""


class DiskSpaceError(SpeedtrainError):
    """Not enough free disk space for what is about to be written."""

    exit_code = 6


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop) outside a training stage: handled like Ctrl-C there, with exit code 143."""

    signal_name = "SIGTERM"
