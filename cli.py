#!/usr/bin/env python
"""LoSA-TAL command line: ``python cli.py COMMAND --help``.

Each command lives in the package that owns it (``<package>/commands.py``) and is imported only
when it is run or listed, and those modules import torch and friends inside their functions, so
``--help`` and ``evaluate`` start in a fraction of a second.
"""
import contextlib
import importlib
import os
import signal
import sys
import threading
import warnings

import click

# Lets ``python cli.py`` work from any directory without installing the project.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from losa_tal import ConfigError, InputError, __version__, flag_errors  # noqa: E402
from store.urls import FLAGS as STORE_URL_FLAGS  # noqa: E402

COMMANDS = {
    "synth": "synth.commands:synth",
    "extract": "extract.commands:extract",
    "videos": "extract.commands:videos",
    "store": "store.commands:store",
    "train": "training.commands:train",
    "infer": "training.commands:infer",
    "detect": "training.commands:detect",
    "convert": "training.commands:convert",
    "evaluate": "evaluation.commands:evaluate",
    "fuse": "evaluation.commands:fuse",
    "visualize": "evaluation.commands:visualize",
    "demo": "synth.commands:demo",
}


# Flags renamed so that each concept has one name in every command (--quiet: no progress bars;
# --annotations: a ground-truth file). The old spellings still work, with a one-line note.
RENAMED_FLAGS = {"--no-progress": "--quiet", "--gt": "--annotations"}


def renamed_flags(args: list) -> list:
    """``args`` with each old flag spelling replaced by its name (a note on stderr says so);
    nothing after ``--`` is touched."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    for index, arg in enumerate(args[:end]):
        old, equals, value = str(arg).partition("=")  # (callers of main() may pass paths)
        if old in RENAMED_FLAGS:
            args[index] = RENAMED_FLAGS[old] + equals + value
            click.echo(f"note: {old} is now {RENAMED_FLAGS[old]}", err=True)
    return args


def show_warning_line(message, category, filename, lineno, file=None, line=None):
    """Library warnings reach the user as one ``warning:`` line on stderr, without source lines."""
    click.echo(f"warning: {message}", err=True)


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, renamed_flags(args))

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx):
        try:
            # Every store-taking command has --storage-options: its name in messages is
            # translated here, once, rather than by each command.
            with warnings.catch_warnings(), stopped_by_sigterm(), flag_errors(STORE_URL_FLAGS):
                warnings.simplefilter("default")
                warnings.showwarning = show_warning_line
                return super().invoke(ctx)
        except (InputError, ConfigError) as err:
            # Bad input is the user's to fix: one line naming the file (or the setting, where a
            # command's flag_errors does not name its flag), never a traceback.
            click.echo(f"error: {err}", err=True)
            ctx.exit(InputError.exit_code)
        except (KeyboardInterrupt, Terminated) as err:
            # Cleanup (finally blocks) has run; a stop is not a failure (exit 1) but a signal.
            sig = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
            click.echo(f"\nstopped by {sig.name}", err=True)
            ctx.exit(128 + sig)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that a terminated command cleans up (drops
    unfinished work, stops its workers) as on Ctrl-C, and says that it stopped."""


@contextlib.contextmanager
def stopped_by_sigterm():
    def terminate(_signum, _frame):
        raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="losa-tal")
def main():
    """LoSA-TAL: temporal action localisation with frozen video foundation models.

    Stage one (extract) caches backbone features in a shared store; stage two (train, infer)
    learns the LoSA adapters and the detection head from that cache; evaluate scores predictions.
    """


if __name__ == "__main__":
    main()
