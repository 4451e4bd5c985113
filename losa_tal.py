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
