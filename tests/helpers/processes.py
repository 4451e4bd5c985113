"""The processes a command left: a command under test runs in its own session, so every
process it starts keeps the session id even once reparented to init. And the scheduling that
every process a test starts inherits."""
import os
from pathlib import Path


def scheduling() -> tuple:
    """This thread's scheduling policy and parameters (() where the system has none to read)."""
    return (os.sched_getscheduler(0), os.sched_getparam(0)) \
        if hasattr(os, "sched_getscheduler") else ()


def session_processes(session: int) -> dict:
    """``{pid: command line}`` of the live (not zombie) processes of a session."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        state, _ppid, _group, sid = stat.rpartition(")")[2].split()[:4]
        if int(sid) == session and state != "Z":
            found[int(entry)] = command.decode(errors="replace")
    return found
