"""Project-wide basics every stage shares: the version, the error types for bad user input,
the typed config loader and the command-line edge that names flags in errors.

Only the standard library at import (PyYAML inside ``load_yaml``), so that any package, and a
config check, can import it without pulling in torch.
"""

import contextlib
import dataclasses
import importlib
import json
import math
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
