"""Stores at URLs (any fsspec protocol: ``s3://``, ``http://``, ``file://``...): recognising
them, the options of their file system (``--storage-options`` on every store-taking command),
and opening and closing that file system. Storage options often hold credentials: they are never
written to a store, a run directory or a log.
HTTP(S) stores get a file system of their own (store/http.py).
"""
from __future__ import annotations

import atexit
import contextlib
import json

import click

from losa_tal import input_error

FLAG = "--storage-options"
# How library messages name it ("check `storage_options`"); cli.py swaps in the flag.
FLAGS = {"storage_options": FLAG}
HELP = ("Options of a URL store's file system (fsspec), as a JSON object, e.g. "
        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}', '{\"profile\": \"lab\"}' or "
        "'{\"anon\": true}'; by default the environment's (AWS_* variables, ~/.aws). For "
        "http(s): '{\"client_kwargs\": {\"timeout\": SECONDS}, \"retries\": N}'.")


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location


def parse_storage_options(text: str | None) -> dict | None:
    """The options given as JSON text (None if not given); a one-line error otherwise."""
    if text is None:
        return None
    try:
        options = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise input_error(FLAG, f"not valid JSON: {' '.join(str(err).split())[:200]}") from None
    if not isinstance(options, dict):
        raise input_error(FLAG, "expected a JSON object of options, e.g. "
                          "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'")
    return options


def check_storage_options(location: str, options: dict | None) -> dict:
    """The options for the store at ``location`` ({} if none); refused for a local path, where
    they would silently do nothing."""
    if options and not is_url(location):
        raise input_error(FLAG, f"applies to URL stores (s3://, http://, file://...) only, not "
                          f"to {location}")
    return dict(options or {})


def storage_options_flag(function):
    """The ``--storage-options JSON`` click option, parsed into a dict (or None)."""
    return click.option(FLAG, "storage_options", metavar="JSON", help=HELP,
                        callback=lambda _ctx, _param, value: parse_storage_options(value))(function)


def open_filesystem(location: str, options: dict, asynchronous: bool = False):
    """``(file system, root path)`` of the store at URL ``location``; its own instance, so that
    closing it (:func:`close_filesystem`) cannot pull a session from under another user.
    ``asynchronous=True`` gives one for Zarr's event loop. One never closed is closed at exit."""
    import importlib

    import fsspec

    importlib.import_module("zarr.core.sync")  # its exit hook (stopping Zarr's loop) comes first

    options = {**options, "skip_instance_cache": True}
    if location.split("://", 1)[0].lower() in ("http", "https"):
        from .http import StoreHTTPFileSystem

        root = location.rstrip("/")
        fs = StoreHTTPFileSystem(root, asynchronous=asynchronous, **options)
    else:
        fs, root = fsspec.core.url_to_fs(location, asynchronous=asynchronous, **options)
    if asynchronous and not fs.async_impl:  # file://: run its calls in threads for Zarr
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        fs = AsyncFileSystemWrapper(fs, asynchronous=True)
    if not _OPEN:
        atexit.register(_close_all)  # runs before Zarr's hook (last registered, first run)
    _OPEN.append(fs)
    return fs, root


# File systems opened and not yet closed: held, so that none is collected with its session open
# (aiohttp then prints "Unclosed client session"), and closed at exit at the latest.
_OPEN: list = []
CLOSE_TIMEOUT_S = 5.0


def _close_all():
    while _OPEN:
        close_filesystem(_OPEN[-1])


def close_filesystem(fs):
    """Close the network session of a file system from :func:`open_filesystem`. An asynchronous
    one is closed on Zarr's event loop, where its requests ran."""
    for index, held in enumerate(_OPEN):
        if held is fs:
            del _OPEN[index]
            break
    if getattr(fs, "_session", None) is None and getattr(fs, "_s3creator", None) is None:
        return  # never connected, or nothing to close (file://)
    # A session that cannot be closed in time is dropped with its connections: nothing is lost.
    with contextlib.suppress(Exception):
        if fs.asynchronous:
            from zarr.core.sync import sync

            sync(_close_sessions(fs), timeout=CLOSE_TIMEOUT_S)
        else:
            from fsspec.asyn import sync

            sync(fs.loop, _close_sessions, fs, timeout=CLOSE_TIMEOUT_S)


async def _close_sessions(fs):
    session = getattr(fs, "_session", None)  # HTTP (aiohttp)
    if session is not None:
        fs._session = None
        await session.close()
    client = getattr(fs, "_s3creator", None)  # S3 (aiobotocore)
    if client is not None:
        fs._s3creator = fs._s3 = None
        await client.__aexit__(None, None, None)

