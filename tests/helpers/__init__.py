"""Helpers shared by the test modules, one module per domain; test modules import nothing from
each other. Import them as ``from helpers.<domain> import ...``: pytest puts tests/ on sys.path
(tests/ is no package), and a child process a test starts puts TESTS_DIR there itself."""
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent.parent
REPO = TESTS_DIR.parent
