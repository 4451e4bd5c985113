"""Peak memory of one statement, measured in a fresh Python process (Linux).

The kernel's high-water mark of the resident set (VmHWM) is reset through /proc/self/clear_refs
after ``setup`` has run, so what is reported is the growth caused by ``statement`` alone, not
the imports, the model building or the input creation before it. torch's CPU allocations do
not show in tracemalloc, so resident memory is the measure that sees them.
"""
import json
import subprocess
import sys
import textwrap

from helpers import REPO, TESTS_DIR

_MEASURE = """
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
{setup}
def _kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as refs:
    refs.write("5")
_before = _kib("VmRSS")
{statement}
print(json.dumps((_kib("VmHWM") - _before) * 1024))
"""


def peak_growth(setup: str, statement: str, timeout: float = 600) -> int:
    """Bytes by which ``statement`` raised the peak resident set of a process that ran
    ``setup`` first (both Python source, run from the repository root)."""
    code = _MEASURE.format(repo=str(REPO), tests=str(TESTS_DIR), setup=textwrap.dedent(setup),
                           statement=textwrap.dedent(statement))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=timeout)
    if result.returncode:
        raise RuntimeError(f"measured statement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
