"""Helpers shared by the test modules, one module per domain; test modules import nothing from
each other. Import them as ``from helpers.<domain> import ...``: pytest puts tests/ on sys.path
(tests/ is no package), and a child process a test starts puts TESTS_DIR there itself."""
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO = TESTS_DIR.parent


def slow_except(cases, fast) -> list:
    """Parametrize ``cases`` with every case marked slow but those in ``fast``: a campaign keeps a
    few representative cases in ``make test-fast`` and runs them all in ``make test``."""
    import pytest

    assert set(fast) <= set(cases), set(fast) - set(cases)
    return [case if case in fast else pytest.param(case, marks=pytest.mark.slow)
            for case in cases]
