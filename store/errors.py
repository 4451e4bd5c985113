"""Storage failures (disk full, read-only, permissions, a URL store's server failing) as one-line
errors naming the store."""
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
TIMED_OUT = "the server stopped answering"
SERVER_FAILED = "the server failed"
CUT_SHORT = "the server's answer was cut short"
_HINTS = {TIMED_OUT: "; to wait longer: `storage_options` '{\"client_kwargs\": {\"timeout\": "
                     "SECONDS}}'"}
_REMOTE_BY_NAME = {
    "EndpointConnectionError": CANNOT_CONNECT, "ConnectTimeoutError": CANNOT_CONNECT,
    "ClientConnectorError": CANNOT_CONNECT, "ServerDisconnectedError": CANNOT_CONNECT,
    "ConnectionTimeoutError": CANNOT_CONNECT,
    "NoCredentialsError": NOT_AUTHORISED, "PartialCredentialsError": NOT_AUTHORISED,
    "ProfileNotFound": NOT_AUTHORISED,
    "ReadTimeoutError": TIMED_OUT, "SocketTimeoutError": TIMED_OUT,
    "ClientPayloadError": CUT_SHORT, "IncompleteReadError": CUT_SHORT,
    "ResponseStreamingError": CUT_SHORT,
}
_REMOTE_BY_STATUS = {401: NOT_AUTHORISED, 403: NOT_AUTHORISED, 404: NOT_FOUND,
                     405: READ_ONLY, 501: READ_ONLY, 500: SERVER_FAILED, 502: SERVER_FAILED,
                     503: SERVER_FAILED, 504: SERVER_FAILED}


class RemoteFailure(InputError):
    """A URL store's server failed a request (no connection, no answer, an error status, a cut
    answer): it says nothing about the store's data, so a reader stops instead of calling the
    video it was reading bad."""


def _remote_kind(err: BaseException):
    """``(kind, the server's own words)`` of a URL store's failure; None if ``err`` is not one."""
    seen = err
    while seen is not None:
        kind = _REMOTE_BY_NAME.get(type(seen).__name__) or \
            _REMOTE_BY_STATUS.get(getattr(seen, "status", None))
        if kind is None and isinstance(seen, TimeoutError):
            kind = TIMED_OUT
        if kind is None and isinstance(seen, ConnectionError):
            kind = CANNOT_CONNECT
        if kind is None and isinstance(seen, PermissionError):
            kind = NOT_AUTHORISED
        if kind is None and isinstance(seen, FileNotFoundError):
            kind = NOT_FOUND
        if kind is not None:
            return kind, " ".join(str(seen).split())[:200]
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


def remote_problem(err: BaseException) -> str | None:
    """The kind of a URL store's failure (cannot connect, not authorised, not found, read-only,
    no answer, a server error, a cut answer), with the server's own words; None if ``err`` is
    not one."""
    found = _remote_kind(err)
    if found is None:
        return None
    kind, detail = found
    return (f"{kind} ({detail})" if detail else kind) + _HINTS.get(kind, "")


def _remote_error(store, action: str, err: BaseException):
    """The one-line error for a URL store's failure (a RemoteFailure unless the thing was not
    there), or None."""
    found = _remote_kind(err) if is_url(str(store)) else None
    if found is None:
        return None
    kind = RemoteFailure if found[0] != NOT_FOUND else InputError
    return kind(f"{store}: {action}: {remote_problem(err)}")


@contextlib.contextmanager
def remote_errors(store, action: str):
    """A URL store's failed request becomes one line naming the store (other errors pass)."""
    try:
        yield
    except Exception as err:
        error = None if isinstance(err, InputError) else _remote_error(store, action, err)
        if error is None:
            raise
        raise error from err


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
        error = _remote_error(store, action, err)
        if error is None and isinstance(err, OSError):
            error = input_error(store, f"{action}: {describe_os_error(err)}")
        if error is None:
            raise
        if on_error is not None:
            on_error()
        raise error from err
