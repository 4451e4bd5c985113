"""The HDF5 layout (``--format hdf5``): one ``.h5`` file with the Zarr layout's hierarchy.

```
STORE.h5                 root attribute "losa_tal" (JSON text); group /videos
  /videos/<name>         attributes "record" (JSON text), then "complete" = True
  /videos/<name>/last, layer_<i>, times     chunked along T, fletcher32 checksums, NaN fill
  /plan/<part>, /failed/<name>              documents (JSON text, uint8 datasets)
STORE.h5.writers/        staging files, claims, the publish lock and journal (safe to delete when
                         no writer runs and there is no publish.journal)
```

HDF5 has no journal: a process killed while it updates the file's index can leave the index
pointing past the end of the file, and then no video can be listed (we saw it happen when we
killed writers at random). So writers never hold the main file open while they compute, and
appending is made all-or-nothing:

1. each video is written to its own side file in ``STORE.h5.writers/staging``;
2. publishing takes an exclusive lock and copies the video into the main file through
   :class:`store.journal.JournaledFile`, which first saves the old content of every byte it
   overwrites (a few index blocks, about a kilobyte) to ``publish.journal``;
3. the video is marked complete, the file closed, and the journal deleted: that is the commit.

A writer killed anywhere in step 2 or 3 leaves the journal; whoever opens the file next (writer
or reader, under the exclusive lock) rolls the file back to the bytes it had before, with a
warning. Videos already published are never at risk.

Readers open the file for each read under a shared lock, so they see only complete videos while
writers append, and never a handle that went stale under them (opening costs well under 1 ms).

JSON text is written as fixed-length ASCII attributes (documents, which can exceed an attribute's
64 KiB, as uint8 datasets): nothing in the file is variable-length, so the library never reads a
global heap. Stores written before kept variable-length strings there, and one damaged length in
a heap collection makes the HDF5 library loop forever inside ``H5Aread``; such a store's
attributes are read once in a child process first (:func:`_check_attributes_in_child`), which is
killed if it stops making progress or runs too long, and never outlives its command.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
import uuid
import warnings

import numpy as np

from losa_tal import InputError, input_error

from . import locks
from .errors import describe_os_error
from .journal import FailSafeFile, JournaledFile, roll_back

ROOT_META_KEY = "losa_tal"
VIDEOS = "videos"
STAGED_GROUP = "video"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# How long the child that reads a variable-length store's attributes may take to start (import
# h5py, open the file), then to read any one attribute, and in all, before the file is called
# damaged. The total is also the child's CPU-time limit, so a child whose command was killed
# ends by itself where the system cannot end it with its parent.
CHILD_START_SECONDS = 60.0
CHILD_STALL_SECONDS = 10.0
CHILD_TOTAL_SECONDS = 300.0


def _h5py():
    import h5py

    return h5py


class Hdf5Backend:
    format = "hdf5"
    format_version = 1
    readable_versions = (1,)
    # The publish lock makes each append exclusive, so a file created only if absent is never
    # needed; the store requires working locks instead (one machine, see docs/store.md).
    exclusive_create = True

    def __init__(self, location, writable: bool):
        self.location = os.path.abspath(str(location))
        self._writers = self.location + ".writers"
        self._publish_lock = os.path.join(self._writers, "publish.lock")
        self._journal = os.path.join(self._writers, "publish.journal")
        self._handle = None
        self._complete = {}
        self._listed = False  # whether the videos were listed once (committed_names)
        self._staging = None
        self._attributes_checked = False  # a variable-length store's, by the child (once)

    # -- creation --------------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, location, meta: dict) -> "Hdf5Backend":
        path = os.path.abspath(str(location))
        backend = cls(path, writable=True)
        # The publish lock exists before the file does (or before this writer's first append):
        # a reader that finds no lock file reads unlocked, which is safe only while no writer
        # has ever appended.
        try:
            os.makedirs(backend._writers, exist_ok=True)
            os.close(os.open(backend._publish_lock, os.O_RDWR | os.O_CREAT, 0o666))
        except OSError:
            if not os.path.exists(path):
                raise
            # An existing store on read-only storage: refused at the first write, by name.
        if not os.path.exists(path):
            building = f"{path}.creating-{uuid.uuid4().hex[:12]}"
            try:
                with _h5py().File(building, "w", locking=False) as handle:
                    handle.attrs[ROOT_META_KEY] = _json_text(meta)
                    handle.create_group(VIDEOS)
                try:
                    os.link(building, path)  # unlike rename, never replaces a racing writer's file
                except FileExistsError:
                    pass  # another writer created it first
                except OSError:  # no hard links on this file system: rename, slightly racier
                    if not os.path.exists(path):
                        os.rename(building, path)
            finally:
                locks.remove_path(building)
        return backend

    @staticmethod
    def is_store(location) -> bool:
        try:
            with open(str(location), "rb") as handle:
                return handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
        except OSError:
            return False

    def read_meta(self):
        with self._reading_metadata():
            raw = self._text(self._handle.attrs, ROOT_META_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return "not JSON"

    # -- reading ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reading(self):
        """The file, open for the block, under a shared lock: a writer publishes only between
        reads, so the handle never sees a half-updated index (nested blocks share the handle)."""
        if self._handle is not None:
            yield
            return
        with self._published():
            self._handle = _h5py().File(self.location, "r", locking=False)
            try:
                yield
            finally:
                self._handle.close()
                self._handle = None

    @contextlib.contextmanager
    def _published(self):
        """Hold the publish lock shared, once no append is unfinished. A writer holds the lock
        exclusively while its journal exists, so a reader waits for a live writer; a journal
        still there under the shared lock is a dead writer's, and is rolled back first."""
        while True:
            with locks.held_if_present(self._publish_lock):
                if not os.path.exists(self._journal):
                    yield
                    return
            try:
                with locks.held_if_present(self._publish_lock, shared=False):
                    self._roll_back_interrupted_publish()
            except OSError as err:
                raise input_error(self.location, "a writer died while appending to this file; "
                                  "it needs one access with write permission to be rolled back "
                                  f"({describe_os_error(err)})") from err

    @contextlib.contextmanager
    def _reading_metadata(self):
        """``reading()``, where what the HDF5 library raises on a damaged index, name heap or
        attribute (RuntimeError, KeyError, ValueError, an OSError without errno) is one line
        naming the file; a video's own data is checked where it is read."""
        try:
            with self.reading():
                yield
        except InputError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as err:
            if isinstance(err, OSError) and err.errno is not None:
                raise  # the disk, not the file: storage_errors says which
            raise _damaged(self.location, " ".join(str(err).split())[:200]) from err

    def _text(self, attrs, key: str):
        """The JSON text attribute ``key`` (bytes, or str in stores written before), or None. A
        variable-length one is read only once the child found that reading it ends."""
        if key not in attrs:
            return None
        if not self._attributes_checked and _is_variable_length(attrs.get_id(key).dtype):
            _check_attributes_in_child(self.location)
            self._attributes_checked = True
        return attrs[key]

    def committed_names(self) -> list[str]:
        with self._reading_metadata():
            for name in self._videos():
                self._remember_if_complete(name)
        self._listed = True
        return list(self._complete)

    def prefetch(self, names: list[str]):
        pass  # one local file: records are read as cheaply one by one

    def commit_problem(self, name: str):
        return None  # a video's record is part of its group; its reads name any damage

    def record(self, name: str):
        if name not in self._complete:
            if not self._listed:  # a lookup by name misses a damaged name heap; a listing not
                self.committed_names()
            with self._reading_metadata():
                self._remember_if_complete(name)
        return self._complete.get(name)

    def _remember_if_complete(self, name):
        if name in self._complete:
            return
        group = self._videos().get(name)
        if not isinstance(group, _h5py().Group) or not _is_marked_complete(group):
            return
        try:
            record = json.loads(self._text(group.attrs, "record"))
        except (TypeError, ValueError):
            record = None
        self._complete[name] = record if isinstance(record, dict) else {"complete": True}

    def _videos(self):
        """The open file's video groups. Every store has the group (it is created with the
        file), so a file without it is damaged, not empty."""
        group = self._handle.get(VIDEOS)
        if not isinstance(group, _h5py().Group):
            raise _damaged(self.location, f"no /{VIDEOS} group")
        return group

    def array(self, name: str, key: str):
        """The dataset (valid inside ``reading()`` only), or None."""
        group = self._videos().get(name)
        dataset = group.get(key) if isinstance(group, _h5py().Group) else None
        return dataset if isinstance(dataset, _h5py().Dataset) else None

    def incomplete_videos(self) -> list[str]:
        with self._reading_metadata():
            names = list(self._videos())
        return sorted(set(names) - set(self.committed_names()))

    # -- documents (the plan): attributes of one group, appended like a video ----------------------
    def read_documents(self, folder: str) -> list[tuple[str, bytes]]:
        with self._reading_metadata():
            group = self._handle.get(folder)
            if not isinstance(group, _h5py().Group):
                return []
            # Stores written before keep documents as attributes, new ones as datasets.
            documents = {name: _as_bytes(self._text(group.attrs, name)) for name in group.attrs}
            for name, dataset in group.items():
                if isinstance(dataset, _h5py().Dataset):
                    documents[name] = dataset[()].tobytes()
            return sorted(documents.items())

    def create_document(self, folder: str, name: str, data: bytes) -> bool:
        def add(main) -> bool:
            group = main.require_group(folder)
            if name in group.attrs or name in group:
                return False
            group.create_dataset(name, data=np.frombuffer(data, dtype=np.uint8))
            return True

        return self._append(add)

    def require_writable_layout(self):
        pass

    # -- writing ---------------------------------------------------------------------------------
    @property
    def claims_dir(self):
        return os.path.join(self._writers, "claims")

    takes_parts = False  # one file on one machine: videos are written whole (store/parts.py)

    def begin(self, name: str, part=None) -> "Hdf5Staging":
        if part is not None:
            raise ValueError(f"{self.location}: HDF5 stores take whole videos, not parts")
        if self._staging is None:
            self._staging = locks.StagingArea(os.path.join(self._writers, "staging"))
        return Hdf5Staging(self._staging.new_path(".h5"), lambda path: self._publish(name, path))

    def _publish(self, name: str, staged: str) -> bool:
        def copy_in(main) -> bool:
            with _h5py().File(staged, "r", locking=False) as source:
                return self._copy_in(main, name, source)

        published = self._append(copy_in)
        locks.remove_path(staged)
        return published

    def _append(self, change):
        """Run ``change(open main file)`` all or nothing: under the exclusive publish lock,
        through the undo journal, rolled back if anything fails or the process dies."""
        with locks.exclusive(self._publish_lock):
            self._roll_back_interrupted_publish()
            try:
                main_file = JournaledFile(self.location, self._journal)
            except BaseException:
                roll_back(self.location, self._journal)  # its header was cut: nothing to undo
                raise
            try:
                with _h5py().File(main_file, "a") as main:
                    result = change(main)
                main_file.check()
            except BaseException:
                main_file.close()
                roll_back(self.location, self._journal)  # a failed write leaves no trace either
                raise
            main_file.commit()
        return result

    @staticmethod
    def _copy_in(main, name: str, source) -> bool:
        videos = main.require_group(VIDEOS)
        existing = videos.get(name)
        if existing is not None and _is_marked_complete(existing):
            return False  # another writer was first: keep theirs
        if existing is not None:
            del videos[name]  # unmarked: not ours to keep (files from older versions)
        main.copy(source[STAGED_GROUP], videos, name=name)
        videos[name].attrs["complete"] = True
        return True

    def _roll_back_interrupted_publish(self):
        """Call with the exclusive lock held: undo the append of a writer that died in it."""
        try:
            rolled_back = roll_back(self.location, self._journal)
        except ValueError as err:
            raise input_error(self.location, str(err)) from None
        if rolled_back:
            warnings.warn(f"{self.location}: rolled back the unfinished append of a writer that "
                          "died; its video will be written again by the next run", stacklevel=2)

    def leftovers(self, older_than: float) -> list:
        return []  # dead writers' side files go by their free locks (one machine): remove_stale

    def committed_parts(self) -> dict:
        return {}

    def remove_stale(self) -> int:
        return locks.remove_stale(os.path.join(self._writers, "staging"))

    def close(self):
        if self._staging is not None:
            self._staging.close()
            self._staging = None


def _damaged(location, problem: str):
    return input_error(location, f"damaged HDF5 metadata ({problem}); restore the file from a "
                       "copy, or extract into a new store")


def _json_text(value):
    """``value`` as JSON in a fixed-length ASCII string (json.dumps escapes all else)."""
    return np.bytes_(json.dumps(value).encode("ascii"))


def _as_bytes(text) -> bytes:
    return text if isinstance(text, bytes) else str(text).encode()


def _is_variable_length(dtype) -> bool:
    string = _h5py().check_string_dtype(dtype)
    return (string is not None and string.length is None) or \
        _h5py().check_vlen_dtype(dtype) is not None


# Reads every attribute of every group reached by hard links (the only attributes a command
# reads), each group once (links can form cycles), printing a line after each: the parent sees
# progress. Errors are passed over (the parent meets them itself, as one line); only a hang or a
# crash of the library matters here.
# The child dies with the command (Linux), by SIGINT/SIGTERM like the command, and at its CPU
# limit in any case: a child stuck in the library never returns to Python to notice anything.
# It runs under ordinary scheduling: a spinning child that inherited a real-time policy kept
# its real-time parent, whose watchdog would kill it, off the CPU.
_READ_ATTRIBUTES = """
import os, resource, signal, sys
location, parent, cpu_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if sys.platform.startswith("linux"):
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    sys.exit(1)  # the command ended before the line above took effect
if hasattr(os, "sched_setscheduler"):  # below a real-time command: it must get to kill this one
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
if hard != resource.RLIM_INFINITY:
    cpu_seconds = min(cpu_seconds, hard)
resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, hard))
for number in (signal.SIGINT, signal.SIGXCPU):
    signal.signal(number, signal.SIG_DFL)
import h5py
def read(obj):
    for name in list(obj.attrs):
        try: obj.attrs[name]
        except Exception: pass
        print(flush=True)
def walk(root):
    seen, groups = set(), [root]
    while groups:
        group = groups.pop()
        try: address = h5py.h5o.get_info(group.id).addr
        except Exception: continue
        if address in seen: continue
        seen.add(address)
        read(group)
        for name in list(group):
            try:
                if isinstance(group.get(name, getlink=True), h5py.HardLink) and \
                        group.get(name, getclass=True) is h5py.Group:
                    groups.append(group[name])
            except Exception: pass
with h5py.File(location, "r", locking=False) as handle:
    print(flush=True)
    try: walk(handle)
    except Exception: pass
"""


def _attribute_reader(location: str, cpu_seconds: float) -> list[str]:
    """The command line of the child that reads ``location``'s attributes."""
    return [sys.executable, "-c", _READ_ATTRIBUTES, location, str(os.getpid()),
            str(max(1, round(cpu_seconds)))]


def _check_attributes_in_child(location: str):
    """Read the file's attributes in a child process first: a damaged global heap can make the
    HDF5 library loop forever (or crash), which no exception reports, so the child is killed
    if it stalls or runs past the total limit, and the file called damaged."""
    child = subprocess.Popen(_attribute_reader(location, CHILD_TOTAL_SECONDS),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    started = time.monotonic()
    try:
        limit = CHILD_START_SECONDS
        while True:
            waited = time.monotonic()
            left = started + CHILD_TOTAL_SECONDS - waited
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, min(limit, left)))
            if not ready and limit < left:
                raise _damaged(location, "reading its attributes made the HDF5 library stop "
                               f"responding ({time.monotonic() - waited:.0f} s)")
            if not ready:
                raise _damaged(location, "reading its attributes did not end within "
                               f"{CHILD_TOTAL_SECONDS:.0f} s")
            if not os.read(child.stdout.fileno(), 65536):
                break  # the child finished
            limit = CHILD_STALL_SECONDS
        returncode = child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    if returncode < 0:
        raise _damaged(location, f"reading its attributes crashed the HDF5 library (signal "
                       f"{-returncode})")


def _is_marked_complete(group) -> bool:
    value = group.attrs.get("complete")
    return isinstance(value, (bool, np.bool_)) and bool(value)


class Hdf5Staging:
    """One video written to its own side file; ``publish`` copies it into the store."""

    def __init__(self, path: str, publish):
        self._path, self._publish = path, publish
        self._raw = FailSafeFile(path, "w+b")  # a full disk is an OSError, never a crash
        self._file = _h5py().File(self._raw, "w")
        self._group = self._file.create_group(STAGED_GROUP)
        self._raw.check()

    def create_array(self, key: str, shape, dtype, chunks):
        if key in self._group:
            del self._group[key]
        self._group.create_dataset(key, shape=shape, dtype=dtype, chunks=chunks,
                                   fillvalue=np.nan, fletcher32=True)
        self._raw.check()

    def write(self, key: str, start: int, values: np.ndarray):
        self._group[key][start:start + len(values)] = values
        self._raw.check()

    def read(self, key: str) -> np.ndarray:
        return self._group[key][...]

    def publish(self, record: dict) -> bool:
        self._group.attrs["record"] = _json_text(record)
        self._close()
        self._raw.check()
        return self._publish(self._path)

    def _close(self):
        if self._file.id.valid:
            self._file.close()
        if not self._raw.closed:
            self._raw.close()

    def discard(self):
        self._close()
        locks.remove_path(self._path)
