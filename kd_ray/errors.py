"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""


class KdRayError(Exception):
    """Base class: the message names what is wrong and how to fix it."""


class ConfigError(KdRayError):
    """Bad config value, unknown key or unknown registry name."""


class DataError(KdRayError):
    """Missing data root or split, empty class folder, corrupt image, class mismatch."""


class TeacherError(KdRayError):
    """Teacher file missing, unreadable or not matching the dataset."""


class NonFiniteLossError(KdRayError):
    """Loss became NaN or inf; raised with the epoch and step."""


class PeerFailedError(KdRayError):
    """Another rank hit one of the errors above; this rank stops at the same step."""


class RunFailedError(RuntimeError):
    """Training failed after Ray's retries (run.max_failures); finished epochs are kept."""
