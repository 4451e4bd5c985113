"""Project-wide basics every stage shares: the version, the error types for bad user input,
the typed config loader, the command-line edge that names flags in errors, and the one way every
output file is written (``open_output``).

Only the standard library at import (PyYAML inside ``load_yaml``), so that any package, and a
config check, can import it without pulling in torch.
"""

import contextlib
import dataclasses
import errno
import importlib
import importlib.resources
import json
import math
import os
import stat
import tempfile
import types
import typing
from pathlib import Path

__version__ = "0.1.0"


class InputError(Exception):
    """A problem with something the user gave us (a file, a flag, a config).

    The message is shown as one line, without a traceback, so it must name the file (or the
    option) and say what is wrong with it: ``"preds.json: 'results' is missing"``.
    """

    exit_code = 2


def input_error(path, problem: str) -> InputError:
    """Build an InputError whose message starts with the offending file's name."""
    return InputError(f"{path}: {problem}")


def lazy_attributes(package: str, homes: dict):
    """A package's PEP 562 ``__getattr__``: ``homes`` maps each public name to the module that
    defines it, imported on first use, so a torch-free submodule imports without torch."""
    def __getattr__(name):
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__


# A parser that meets more nesting than Python's recursion limit raises RecursionError (10^5
# brackets in a file or a --set value did); every reader of user files says this instead.
TOO_DEEP = "nested too deeply"


def load_yaml(text: str):
    """YAML's safe subset, without aliases (``*name``). PyYAML shares an alias's node, but
    anything that walks the result expands it: a dozen lines of nested aliases (an "alias
    bomb") become billions of values. No config of ours needs them. Raises ``yaml.YAMLError``
    (RecursionError for nesting too deep)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.composer.ComposerError(
                    None, None, "aliases (*name) are not allowed", self.peek_event().start_mark)
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader


# ---------------------------------------------------------------------------------------------
# Typed configs. Every component (head, LoSA, the data pipeline, extraction, ...) declares its
# settings as one dataclass beside its code: the only place their defaults live. A dataclass may
# define ``check()``, which raises ConfigError for a value outside its range; ``build_config``
# turns plain JSON data into such dataclasses and adds the file and dotted key to any problem.
# Nothing here imports torch, so a bad config is refused before any model code loads.


class ConfigError(ValueError):
    """A setting outside what its component accepts. ``key`` names the field (dotted below the
    component, ``"window"`` or ``"losa.num_heads"``); the config edge prefixes its section."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def check_values(checks) -> None:
    """Raise ConfigError for the first ``(key, ok, expected, value)`` whose ``ok`` is False:
    ``key: must be <expected>, got <value>``. Write range tests so that NaN fails them."""
    for key, ok, expected, value in checks:
        if not ok:
            raise ConfigError(key, f"must be {expected}, got {value!r}")


def check_positive_integers(**values) -> None:
    check_values((key, value >= 1, "a positive integer", value) for key, value in values.items())


def finite_and_at_least(value: float, low: float) -> bool:
    """For range checks: False for NaN and infinities as well as for values under ``low``."""
    return math.isfinite(value) and value >= low


def checked_config(cls, arguments: dict):
    """Config dataclass ``cls`` from the entries of ``arguments`` (a constructor's ``locals()``)
    that are its fields, after its ``check()``: constructors refuse what configs refuse."""
    config = cls(**{name: arguments[name] for name in cls.__dataclass_fields__})
    config.check()
    return config


def config_arguments(config) -> dict:
    """A config dataclass's fields as keyword arguments (the reverse of ``checked_config``)."""
    return {name: getattr(config, name) for name in type(config).__dataclass_fields__}


@contextlib.contextmanager
def flag_errors(flags: dict, origins: dict | None = None):
    """The command-line edge of library checks: around the call that takes a command's flags.

    ``flags`` maps the library's names for values to the command's flags
    (``{"tiou_threshold": "--tiou"}``). A ConfigError about a mapped key becomes the one-line
    ``--tiou: problem``; in the message of that or of any InputError, a key that the library
    names in backticks ("pass `resume` to continue it") becomes its flag ("pass --resume").
    ``origins`` (optional) says where each dotted key's value came from where that may be a
    file or ``--set`` rather than a flag; its entries win over ``flags`` and cover the keys
    below them (``"protocol"`` covers ``"protocol.fps"``). A key named by a source other than
    its own flag is repeated after it: ``--set: protocol.fps: ...``, ``--fps: protocol fps:``.
    """
    try:
        yield
    except ConfigError as err:
        source = _origin(err.key, origins or {}) or flags.get(err.key)
        if source is None:
            raise
        if source == flags.get(err.key) and "." not in err.key:
            named = ""
        else:
            named = err.key.replace(".", " ") if source in flags.values() else err.key
            named += ": "
        message = f"{source}: {named}{err.problem}"
        raise InputError(_named_by_flags(message, flags)) from None
    except InputError as err:
        raise InputError(_named_by_flags(str(err), flags)) from None


def _origin(key: str, origins: dict):
    """The source of ``key`` or of the closest section above it in ``origins``."""
    parts = key.split(".")
    return next((origins[".".join(parts[:end])] for end in range(len(parts), 0, -1)
                 if ".".join(parts[:end]) in origins), None)


def _named_by_flags(message: str, flags: dict) -> str:
    for key, flag in flags.items():
        message = message.replace(f"`{key}`", flag)
    return message


def shipped_configs() -> Path:
    """The folder of shipped presets and recipes (datasets/, train/, demo/): the checkout's
    ``configs/`` when running from one (setup.cfg beside this file), else the copy an install
    carries as package data, ``losa_tal_configs`` (setup.cfg)."""
    here = Path(__file__).resolve().parent
    if (here / "setup.cfg").is_file() and (here / "configs").is_dir():
        return here / "configs"
    return Path(str(importlib.resources.files("losa_tal_configs")))


def find_recipe(value) -> Path:
    """A training config given as a path, or by the name of a shipped recipe (``thumos_vitg_losa``
    for configs/train/thumos_vitg_losa.json, ``demo/train``), so that an install without the
    checkout runs the recipes too; ``configs/train/x.json`` falls back to the shipped file when
    there is no such file here. A missing file is an InputError listing the shipped recipes."""
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_configs()
    relative = path.relative_to("configs") if path.parts[:1] == ("configs",) else path
    for candidate in (shipped / relative, shipped / relative.with_suffix(".json"),
                      shipped / "train" / relative.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    names = sorted(str(p.relative_to(shipped).with_suffix("")).removeprefix("train/")
                   for p in shipped.glob("*/*.json") if p.parent.name != "datasets")
    raise input_error(value, f"config file not found (shipped recipes: {', '.join(names)})")


def read_config_file(path, shape: str = "a config must be a JSON object of sections") -> dict:
    """The object in a JSON file (YAML for ``.yaml``/``.yml``: ``load_yaml``'s safe subset), or
    an InputError naming the file; ``shape`` says what a file holding something else lacks."""
    import yaml

    path = Path(path)
    language = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "JSON"
    try:
        text = path.read_text()
        raw = load_yaml(text) if language == "YAML" else json.loads(text)
    except FileNotFoundError:
        raise input_error(path, "config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise input_error(path, f"cannot read config ({err})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise input_error(path, f"not valid {language} ({' '.join(str(err).split())[:200]})") \
            from None
    except RecursionError:
        raise input_error(path, f"not valid {language} ({TOO_DEEP})") from None
    if not isinstance(raw, dict):
        raise input_error(path, shape)
    return raw


def parse_override(item: str):
    """``"optim.lr_head=2e-4"`` -> ``(["optim", "lr_head"], 2e-4)``: the value is a JSON
    literal, or a string when it is not valid JSON (``model.type=head_only``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set {item}: expected key.sub=value")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    except RecursionError:
        raise InputError(f"--set {key.strip()}: {TOO_DEEP}") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides) -> dict:
    """Apply ``--set key.sub=value`` items to plain config data, in place."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item}: {'.'.join(keys[:depth + 1])} is not a section")
        node[keys[-1]] = value
    return raw


def build_config(cls, raw, source: str, prefix: str = ""):
    """Instantiate dataclass ``cls`` from plain data: unknown keys, wrong types and values its
    ``check()`` refuses are InputErrors naming ``source`` and the dotted key."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise input_error(source, f"{where}: expected an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise input_error(
            source, f"{prefix}{unknown[0]}: unknown key (known in {where}: {', '.join(sorted(known))})"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build_config(hint, value, source, f"{prefix}{name}.")
        elif not _matches(value, hint):
            raise input_error(source, f"{prefix}{name}: expected {_describe(hint)}, "
                              f"got {json.dumps(value)}")
        else:
            values[name] = value
    try:
        config = cls(**values)  # a frozen dataclass may check itself here (__post_init__)
        if hasattr(config, "check"):
            config.check()
    except ConfigError as err:
        raise input_error(source, f"{prefix}{err.key}: {err.problem}") from None
    return config


def _matches(value, hint) -> bool:
    """Whether plain JSON data fits a type hint; ints count as numbers where floats are
    expected, booleans never count as numbers."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if origin is list:
        item = typing.get_args(hint)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(item) or _describe(item)}"
    if hint is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "an object"}[hint]


# ---------------------------------------------------------------------------------------------
# Output files. Every file the project writes (predictions, reports, figures, exports,
# checkpoints, run-directory files, synthetic data) goes through open_output. Folders are often
# shared: nothing another user plants there (a link at a guessable name) may redirect a write,
# and a device, FIFO or terminal given as the output is written, never replaced by a file.

_WRITTEN_IN_PLACE = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device"}
_REFUSED = {stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


@contextlib.contextmanager
def open_output(path, durable: bool = False):
    """A binary file whose bytes become ``path`` when the block ends without an exception.

    A new file, or one replacing a regular file, is written to a temporary file created
    exclusively under an unpredictable name in the same folder (``mkstemp``: no link can be
    planted where it will be), then renamed over ``path``: a reader sees the old file or the new
    one whole, concurrent writers end with one of their files whole, and a failure leaves the
    old file as it was. ``durable``: the data and the rename reach the disk before this returns
    (checkpoints, predictions, exports: a power cut must not leave an empty file behind).

    What already exists at ``path`` decides:
    - a symbolic link is replaced by the new file, never followed (the file it names is left as
      it was), except a link to one of this process's descriptors (``/dev/stdout``,
      ``/dev/fd/N``), which is written where the descriptor points, as a shell redirection is;
    - a FIFO or a character device (``/dev/null``, a terminal) is written in place, never
      replaced (a FIFO blocks until someone reads it; ``/dev/full`` fails with ENOSPC);
    - a block device or a socket is refused (InputError), a folder is IsADirectoryError.
    Write failures are the OSError they are, for the caller to word (``output_errors``).
    """
    path = os.fspath(path)
    in_place = _open_in_place(path)
    if in_place is not None:
        with os.fdopen(in_place, "wb") as file:
            yield file
        return
    folder = make_parent_folder(path)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_current_umask())  # mkstemp makes files only we can read
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a half-written file would only hold on to space
            os.unlink(temporary)
        raise
    if durable:
        _fsync_folder(folder)


def write_output(path, data, durable: bool = False) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` through :func:`open_output`."""
    with open_output(path, durable) as file:
        file.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def output_errors(path):
    """An output that cannot be written (a folder in the way, no permission, a full disk) is one
    line naming it."""
    try:
        yield
    except OSError as err:
        raise input_error(path, f"cannot write ({err.strerror or err})") from None


def make_parent_folder(path) -> str:
    """Create the folder ``path`` goes into; returns it."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise input_error(folder, "is a file, expected a folder")
    os.makedirs(folder, exist_ok=True)
    return folder


def _open_in_place(path: str):
    """A descriptor to write ``path`` through when it must not be replaced, else None."""
    own = _own_descriptor(path)
    if own is not None:
        return os.dup(own)
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):  # new (make_parent_folder says the rest)
        return None
    if kind in _REFUSED:
        raise input_error(path, f"is {_REFUSED[kind]}; refusing to write over it (choose a file)")
    if kind == stat.S_IFDIR:
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if kind not in _WRITTEN_IN_PLACE:
        return None  # a regular file or a link: replaced
    handle = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    if stat.S_IFMT(os.fstat(handle).st_mode) != kind:  # swapped meanwhile: replace it instead
        os.close(handle)
        return None
    return handle


def _own_descriptor(path: str):
    """The descriptor number when ``path`` is a link chain ending at one of this process's open
    descriptors (``/dev/stdout`` -> ``/proc/self/fd/1``, ``/dev/fd/3``), else None."""
    own = os.path.realpath("/proc/self/fd")
    for _ in range(8):  # a longer chain is no descriptor link
        if not os.path.islink(path):
            return None
        folder, name = os.path.split(os.path.abspath(path))
        if name.isdigit() and os.path.realpath(folder) == own:
            return int(name)
        path = os.path.join(folder, os.readlink(path))
    return None


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (some file systems cannot sync a folder: no matter)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
