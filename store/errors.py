"""Storage failures (disk full, read-only, permissions) as one-line errors naming the store."""
import contextlib
import errno

from losa_tal import InputError, input_error

from .urls import is_url

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    **dict.fromkeys((errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP),
                    "this file system refuses file locks, which HDF5 stores need (write a Zarr "
                    "store here)"),
}


# What a failed request to a URL store means. The file systems (s3fs, HTTP, gcsfs...) raise
# their own exception types, so they are told apart by name along the exception's chain.
CANNOT_CONNECT = "cannot connect to the store's server"
NOT_AUTHORISED = "not authorised (check the credentials: `storage_options` or the environment)"
NOT_FOUND = "not found"
READ_ONLY = "read-only: this server does not accept writes (http:// stores are read-only)"
_REMOTE_BY_NAME = {
    "EndpointConnectionError": CANNOT_CONNECT, "ConnectTimeoutError": CANNOT_CONNECT,
    "ClientConnectorError": CANNOT_CONNECT, "ServerDisconnectedError": CANNOT_CONNECT,
    "NoCredentialsError": NOT_AUTHORISED, "PartialCredentialsError": NOT_AUTHORISED,
    "ProfileNotFound": NOT_AUTHORISED,
}
_REMOTE_BY_STATUS = {401: NOT_AUTHORISED, 403: NOT_AUTHORISED, 404: NOT_FOUND,
                     405: READ_ONLY, 501: READ_ONLY}


def remote_problem(err: BaseException) -> str | None:
    """The kind of a URL store's failure (cannot connect, not authorised, not found,
    read-only), with the server's own words; None if ``err`` is not one."""
    seen = err
    while seen is not None:
        kind = _REMOTE_BY_NAME.get(type(seen).__name__) or \
            _REMOTE_BY_STATUS.get(getattr(seen, "status", None))
        if kind is None and isinstance(seen, (ConnectionError, TimeoutError)):
            kind = CANNOT_CONNECT
        if kind is None and isinstance(seen, PermissionError):
            kind = NOT_AUTHORISED
        if kind is None and isinstance(seen, FileNotFoundError):
            kind = NOT_FOUND
        if kind is not None:
            detail = " ".join(str(seen).split())[:200]
            return f"{kind} ({detail})" if detail else kind
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def describe_os_error(err: OSError) -> str:
    """What went wrong, in words a user can act on, on one line."""
    return _REASONS.get(err.errno) or " ".join(str(err).split())


@contextlib.contextmanager
def storage_errors(store, action: str, on_error=None):
    """Turn an OSError, or a URL store's failure, into an InputError naming the store;
    ``on_error()`` runs first."""
    try:
        yield
    except Exception as err:
        if isinstance(err, InputError):
            raise
        problem = remote_problem(err) if is_url(str(store)) else None
        if problem is None and isinstance(err, OSError):
            problem = describe_os_error(err)
        if problem is None:
            raise
        if on_error is not None:
            on_error()
        raise input_error(store, f"{action}: {problem}") from err
