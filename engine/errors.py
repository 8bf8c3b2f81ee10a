"""The errors a person can act on. Every one is a ``ValueError`` whose message names what is
wrong (the field, the file, the run) and what is allowed, so the CLI prints it as one line and
the app shows it as a message. They live here, apart from the modules that raise them, so that
the config and the registries need not import each other to share them."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and the allowed values."""


class DataError(ValueError):
    """A data set is missing, incomplete or malformed; the message says where and what."""


class MilDataError(DataError):
    """A MIL data file is missing or malformed; the message names the file and the problem."""


class ImageInputError(ValueError):
    """The file cannot be used as an image; the message says why."""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message says which file and why."""


class RunError(ValueError):
    """A run operation cannot be done; the message says why."""


class JobError(ValueError):
    """A background job cannot be started or stopped; the message says why."""


class EvaluationError(ValueError):
    """A metric cannot be computed for this model or data set; the message says why."""


class FileRefused(OSError):
    """A file was not read: it is not a regular file, it is larger than its kind allows, or it
    lies outside the folders it must stay in. An ``OSError``, so that code which handles an
    unreadable file handles it too; the message names the file and the reason."""
