"""Project-wide basics every stage shares: the version and the error type for bad user input.

Kept in one tiny module so that any package can import it without pulling in torch.
"""

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
