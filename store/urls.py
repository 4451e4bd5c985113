"""Stores at URLs (any fsspec protocol: ``s3://``, ``http://``, ``file://``...): recognising
them, and the options of their file system (``--storage-options`` on every store-taking
command). Storage options often hold credentials: they are never written to a store, a run
directory or a log."""
from __future__ import annotations

import json

import click

from losa_tal import input_error

FLAG = "--storage-options"
# How library messages name it ("check `storage_options`"); cli.py swaps in the flag.
FLAGS = {"storage_options": FLAG}
HELP = ("Options of a URL store's file system (fsspec), as a JSON object, e.g. "
        "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}', '{\"profile\": \"lab\"}' or "
        "'{\"anon\": true}'; by default the environment's (AWS_* variables, ~/.aws).")


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
