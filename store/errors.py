"""Storage failures (disk full, read-only, permissions) as one-line errors naming the store."""
import contextlib
import errno

from losa_tal import input_error

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def describe_os_error(err: OSError) -> str:
    """What went wrong, in words a user can act on, on one line."""
    return _REASONS.get(err.errno) or " ".join(str(err).split())


@contextlib.contextmanager
def storage_errors(store, action: str, on_error=None):
    """Turn an OSError into an InputError naming the store; ``on_error()`` runs first."""
    try:
        yield
    except OSError as err:
        if on_error is not None:
            on_error()
        raise input_error(store, f"{action}: {describe_os_error(err)}") from err
