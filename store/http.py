"""The file system of a store at an ``http://`` or ``https://`` URL: fsspec's, with three things
it leaves to the caller. Store keys hold ``%`` (encoded video names, store/names.py), which a URL
must quote; a server that stops answering would hold a request for aiohttp's 5 minutes; and a
failure that the next try may not see (a 503, a cut connection) would end the command."""
from __future__ import annotations

import asyncio
import functools
import urllib.parse

import aiohttp
from fsspec.asyn import sync_wrapper
from fsspec.implementations.http import HTTPFileSystem

from losa_tal import input_error

from .urls import FLAG

# How long an HTTP(S) server may stay silent (to connect, and between two pieces of an answer)
# before a request is given up, and how many more times a request that failed in a way the next
# try may not see (silence, a cut connection, 429, 5xx) is sent. The worst case per request is
# (1 + HTTP_RETRIES) x HTTP_TIMEOUT_S, plus the pauses.
HTTP_TIMEOUT_S = 30.0
HTTP_RETRIES = 2
RETRY_PAUSE_S = 0.5  # times the try's number
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def _http_timeout(value):
    """aiohttp's timeout from a JSON value: seconds, or an object of ``aiohttp.ClientTimeout``'s
    fields; the whole answer may take as long as it keeps coming."""
    if isinstance(value, aiohttp.ClientTimeout):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return aiohttp.ClientTimeout(total=None, sock_connect=value, sock_read=value)
    if isinstance(value, dict):
        try:
            return aiohttp.ClientTimeout(**value)
        except TypeError as err:
            raise input_error(FLAG, f"client_kwargs timeout: {err}") from None
    raise input_error(FLAG, f"client_kwargs timeout: expected seconds (a positive number) or an "
                      f"object of aiohttp.ClientTimeout fields, got {value!r}")


def _transient(err: BaseException) -> bool:
    """Whether the next try of a request may succeed where this one failed."""
    if isinstance(err, aiohttp.ClientResponseError):
        return err.status in TRANSIENT_STATUSES
    return isinstance(err, (TimeoutError, aiohttp.ClientPayloadError,
                            aiohttp.ClientConnectionError))


def _retried(request):
    """``request`` sent again after a transient failure, at most ``retries`` more times."""
    @functools.wraps(request)
    async def retried(self, url, *args, **kwargs):
        for attempt in range(self.retries + 1):
            try:
                return await request(self, url, *args, **kwargs)
            except Exception as err:
                if attempt == self.retries or not _transient(err):
                    raise
            await asyncio.sleep(RETRY_PAUSE_S * (attempt + 1))

    return retried


class StoreHTTPFileSystem(HTTPFileSystem):
    """fsspec's HTTP file system for the store at ``root``: paths below the root are store keys
    (``%`` is a character of them, quoted in the URL and unquoted in listings), every request
    has a timeout, and transient failures are retried."""

    def __init__(self, root: str, retries: int = HTTP_RETRIES, client_kwargs=None, **options):
        if not (isinstance(retries, int) and not isinstance(retries, bool) and 0 <= retries <= 10):
            raise input_error(FLAG, f"retries: expected a whole number from 0 to 10, got "
                              f"{retries!r}")
        client_kwargs = dict(client_kwargs or {})
        client_kwargs["timeout"] = _http_timeout(client_kwargs.get("timeout", HTTP_TIMEOUT_S))
        super().__init__(client_kwargs=client_kwargs, **options)
        self.root, self.retries = root, retries

    def encode_url(self, url):
        prefix = self.root + "/"
        if url.startswith(prefix):  # the root is the user's URL, quoted as they wrote it
            url = prefix + urllib.parse.quote(url[len(prefix):], safe="/")
        return super().encode_url(url)

    def _key_path(self, url: str) -> str:
        prefix = self.root + "/"
        return prefix + urllib.parse.unquote(url[len(prefix):]) if url.startswith(prefix) else url

    async def _ls(self, url, detail=True, **kwargs):
        # A directory page links its entries by their URL, i.e. quoted.
        found = await super()._ls(url, detail=detail, **kwargs)
        if detail:
            return [{**entry, "name": self._key_path(entry["name"])} for entry in found]
        return sorted(self._key_path(name) for name in found)

    ls = sync_wrapper(_ls)  # the parent's ``ls`` calls the parent's ``_ls``
    _ls_real = _retried(HTTPFileSystem._ls_real)
    _cat_file = _retried(HTTPFileSystem._cat_file)
    _info = _retried(HTTPFileSystem._info)
