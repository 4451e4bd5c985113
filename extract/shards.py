"""Which share of the videos a process extracts: its shard, from the launcher or ``--shard``, and
the order in which it takes videos from the store's plan. Torch-free.

A *shard* is ``index`` of ``count`` (0-based). The launcher decides it, in this precedence:

1. ``--shard i/n`` given on the command line;
2. torchrun (``RANK``/``WORLD_SIZE``, read by ``losa_distributed.launch``);
3. Slurm tasks (``SLURM_PROCID``/``SLURM_NTASKS``: ``srun`` started several processes);
4. nothing: one shard of one.

A Slurm job array (``SLURM_ARRAY_TASK_ID``/``SLURM_ARRAY_TASK_COUNT``) multiplies what 2 or 3
give: each array task is a job of its own, so task ``a`` of ``A`` running ``r`` of ``w`` ranks
(torchrun or srun) is shard ``a * w + r`` of ``A * w``. Under torchrun the Slurm task variables
describe the torchrun agents (one per node), which ``RANK`` already counts, so they are ignored.

The *plan* is the list of videos a store should hold (id, path, duration, and the identity of
its source file), recorded in the store once (``FeatureStore.record_plan``) so that every shard,
and every later resume with another number of shards, works from the same list. ``work_order``
turns it into one shard's order: every planned video exactly once, its own share first (a
longest-first greedy split, balanced by duration), then the other shards' shares from their
tails, so that a shard that is done helps the ones that are not. A video committed meanwhile is
skipped, one claimed (an ``flock``, where locks work) is left to its holder; where locks do not
work two shards may encode the same video near the end, and the store publishes one of them.

A video longer than ``PART_SECONDS`` would hold one GPU past everyone else's share (THUMOS-like
durations at 64 shards: 28 min against 22), so its plan entry records ``"parts": P``
(``part_count``, decided once, so every shard and every resume agrees; an entry without it is one
part). With several shards on a Zarr store the work items are then its parts ``(video_id, k)``
(``work_items``, each weighing duration / P), ordered and shared like videos; part ``k`` is clips
``store.protocol.part_range(k, P, N)`` of the video's N clips, and the store assembles the video
once all parts are committed (store/parts.py). A single shard takes whole videos.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
from dataclasses import dataclass

import losa_distributed
from losa_tal import input_error

SHARD_FLAG = "--shard"
# What identifies a source file besides its size: a hash of its first and last MiB (a whole-file
# hash would read every video once more; a different video of the same size differs there).
HASHED_BYTES = 2**20
# A video longer than this is planned as ceil(duration / PART_SECONDS) parts that shards extract
# separately. bench/shards.py at 64 shards, THUMOS-like, no working locks: 0.93 at 120 s, about
# 0.9 at 150-240 s depending on the draw, 0.87 at 400 s; shorter parts cost more decoding of
# skipped frames and more assembly copies.
PART_SECONDS = 120.0
PART_SECONDS_ENV = "LOSA_TAL_PART_SECONDS"  # overrides it when a plan is recorded (tests)


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    source: str  # what decided it, for the line ``extract`` prints

    def __str__(self):
        return f"shard {self.index}/{self.count} ({self.source})"


SINGLE = Shard(0, 1, "one process")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, 0 <= i < n; a one-line error naming ``--shard`` otherwise."""
    index, slash, count = str(text).strip().partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = None
    if not slash or index is None or count < 1 or not 0 <= index < count:
        raise input_error(SHARD_FLAG, f"expected i/n with 0 <= i < n (e.g. 0/8), got {text!r}")
    return index, count


def launcher_shard(env=os.environ, explicit: str | None = None) -> Shard:
    """This process's shard (see the module docstring for the precedence)."""
    if explicit is not None:
        return Shard(*parse_shard(explicit), SHARD_FLAG)
    if "WORLD_SIZE" in env:
        place = losa_distributed.launch(env)
        rank = _checked(place.rank, place.world_size, "RANK", "WORLD_SIZE")
        sources = ["torchrun"]
    elif "SLURM_NTASKS" in env and "SLURM_PROCID" in env:
        rank = _checked(_integer(env, "SLURM_PROCID"), _integer(env, "SLURM_NTASKS"),
                        "SLURM_PROCID", "SLURM_NTASKS")
        sources = ["Slurm tasks"]
    else:
        rank, sources = (0, 1), []
    if "SLURM_ARRAY_TASK_ID" in env:
        task, tasks = _array_task(env)
        rank = (task * rank[1] + rank[0], tasks * rank[1])
        sources.insert(0, "Slurm job array")
    return Shard(*rank, " x ".join(sources)) if sources else SINGLE


def _checked(index: int, count: int, index_name: str, count_name: str) -> tuple[int, int]:
    if count < 1 or not 0 <= index < count:
        raise input_error(index_name, f"{index} is not a rank of {count_name}={count}; "
                          f"give {SHARD_FLAG} i/n")
    return index, count


def _array_task(env) -> tuple[int, int]:
    """``(index, count)`` of a job array's task: ids run from ``SLURM_ARRAY_TASK_MIN`` in steps
    of ``SLURM_ARRAY_TASK_STEP`` (``--array=1-16`` or ``0-30:2``); a list of ids such as
    ``--array=1,4,9`` has no such numbering and needs ``--shard``."""
    task = _integer(env, "SLURM_ARRAY_TASK_ID")
    count = _integer(env, "SLURM_ARRAY_TASK_COUNT")
    first = _integer(env, "SLURM_ARRAY_TASK_MIN", 0)
    step = max(_integer(env, "SLURM_ARRAY_TASK_STEP", 1), 1)
    last = _integer(env, "SLURM_ARRAY_TASK_MAX", first + (count - 1) * step)
    offset, rest = divmod(task - first, step)
    # A list of ids is refused by every task, not only by those whose id lies past the count.
    if count < 1 or rest or not 0 <= offset < count or last != first + (count - 1) * step:
        raise input_error("SLURM_ARRAY_TASK_ID", f"task {task} is not one of {count} tasks "
                          f"numbered from {first} in steps of {step}; give {SHARD_FLAG} i/n")
    return offset, count


def _integer(env, name: str, default=None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise input_error(name, f"expected an integer, got {value!r}; give {SHARD_FLAG} i/n") \
            from None


# -- the plan ----------------------------------------------------------------------------------
def source_identity(path) -> dict:
    """What identifies a video file: size, modification time and a sha256 of its first and last
    MiB (the whole file when it is smaller than 2 MiB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        mtime = os.fstat(file.fileno()).st_mtime
        digest.update(file.read(HASHED_BYTES))
        if size > HASHED_BYTES:
            file.seek(max(HASHED_BYTES, size - HASHED_BYTES))
            digest.update(file.read(HASHED_BYTES))
    return {"size": size, "mtime": mtime, "sha256_first_last_mib": digest.hexdigest()}


def same_source(recorded: dict, path) -> bool:
    """Whether the file at ``path`` is the one ``recorded`` identifies: the same size, and the
    same modification time or (a copy, which changes it) the same hash."""
    stat = os.stat(path)
    if stat.st_size != recorded.get("size"):
        return False
    return stat.st_mtime == recorded.get("mtime") or \
        source_identity(path)["sha256_first_last_mib"] == recorded.get("sha256_first_last_mib")


def plan_entry(video_id: str, path, duration) -> dict:
    """A video's entry in the plan; its source is None when the file cannot be read (decoding
    then reports it)."""
    try:
        source = source_identity(path)
    except OSError:
        source = None
    return {"video_id": video_id, "path": os.fspath(path), "duration": duration,
            "source": source, "parts": part_count(duration)}


# -- parts of long videos ----------------------------------------------------------------------
def part_count(duration) -> int:
    """How many parts a video of ``duration`` seconds is planned as (1 when unknown)."""
    seconds = os.environ.get(PART_SECONDS_ENV)
    seconds = float(seconds) if seconds else PART_SECONDS
    return max(1, math.ceil(_weight({"duration": duration}) / seconds))


def parts_of(entry: dict) -> int:
    """The parts a plan entry records; an entry planned before parts existed is one."""
    parts = entry.get("parts", 1)
    return parts if isinstance(parts, int) and not isinstance(parts, bool) and parts > 1 else 1


def work_items(plan: list, split: bool = True) -> list[tuple]:
    """``(item, weight)`` of every unit of work in ``plan``: a video's id, or for a video
    planned in P > 1 parts (``split``) each ``(video_id, k)``, weighing duration / P."""
    items = []
    for entry in plan:
        parts = parts_of(entry) if split else 1
        if parts == 1:
            items.append((entry["video_id"], _weight(entry)))
        else:
            items += [((entry["video_id"], part), _weight(entry) / parts)
                      for part in range(parts)]
    return items


def item_video(item) -> str:
    return item[0] if isinstance(item, tuple) else item


def is_done(item, done) -> bool:
    """Whether ``item`` is finished, ``done`` holding committed video ids and committed parts
    ``(video_id, k)``: a part of a committed video is finished too."""
    return item in done or (isinstance(item, tuple) and item[0] in done)


def planned(store, videos: list, shard: Shard, duration) -> dict:
    """``{video_id: plan entry}`` of ``videos`` (``[(video_id, path)]``) as the store's plan has
    them, after recording those it lacks (``duration(video_id, path)`` estimates each one's).

    An entry hashes 2 MiB of its file, so shards that start together share the work: each
    records its own slice of what is missing first, then whatever is still missing, a slice at a
    time, reading what the others recorded meanwhile."""
    plan = _by_id(store.planned_videos() or [])
    missing = [(video_id, path) for video_id, path in videos if video_id not in plan]
    start = len(missing) * shard.index // shard.count
    missing = missing[start:] + missing[:start]
    size = -(-len(missing) // shard.count)
    while missing:
        plan = _by_id(store.record_plan([plan_entry(video_id, path, duration(video_id, path))
                                         for video_id, path in missing[:size]]))
        missing = [item for item in missing if item[0] not in plan]
    return {video_id: plan[video_id] for video_id, _ in videos}


def _by_id(entries: list) -> dict:
    return {entry["video_id"]: entry for entry in entries}


def source_problem(entry: dict, path) -> str | None:
    """Why the file at ``path`` may not be extracted as ``entry``'s video: it is not the file
    the store planned (and perhaps extracted) under that id. None when it is, or when the
    planned file could not be identified."""
    recorded = entry.get("source")
    if not recorded:
        return None
    try:
        if same_source(recorded, path):
            return None
    except OSError as err:
        return f"cannot read {path}: {err.strerror}"
    return (f"{path} is not the file this store planned as video {entry['video_id']!r} "
            f"({entry.get('path')}, {recorded.get('size')} bytes); a store never replaces a "
            "video: extract this file into a new store")


# -- the order of work -------------------------------------------------------------------------
class Shares:
    """Every shard's own share of a plan (work items, longest first) and, given what is
    committed, the item each owner is presumably encoding. Items are ids, and with ``split``
    the parts ``(video_id, k)`` of videos planned in several parts (``work_items``)."""

    def __init__(self, plan: list, count: int, split: bool = True):
        self.owned = shares(plan, count, split)
        self._first = [0] * count  # per share: all before it are committed (committed only grows)

    def order(self, index: int) -> list:
        """Shard ``index``'s order: its own share, then every other shard's share from its end
        (the videos its owner reaches last), shards visited in turn from the next one."""
        count = len(self.owned)
        order = list(self.owned[index])
        for step in range(1, count):
            order += reversed(self.owned[(index + step) % count])
        return order

    def at_work(self, done, but: int, depth: int = 1) -> set:
        """The first ``depth`` unfinished items of every share but shard ``but``'s (``done``:
        committed ids and parts, see ``is_done``): an owner works through its share in order,
        ``depth`` items at a time, so it is on those unless it died or has not started. Other
        shards leave them alone: where claims do not work, that is all that keeps two shards
        off one item, and a long one encoded twice would make everyone wait for the copy."""
        busy = set()
        for index, share in enumerate(self.owned):
            first = self._first[index]
            while first < len(share) and is_done(share[first], done):
                first += 1
            self._first[index] = first
            if index != but:
                waiting = (item for item in share[first:] if not is_done(item, done))
                busy.update(itertools.islice(waiting, depth))
        return busy


def shares(plan: list, count: int, split: bool = True) -> list[list]:
    """Every shard's own work items (``work_items``), longest first: each in turn goes to the
    shard with the least planned time (then the fewest items, then the lowest index). A video
    of unknown duration weighs nothing."""
    ordered = sorted(work_items(plan, split), key=lambda pair: (
        -pair[1], item_video(pair[0]), pair[0][1] if isinstance(pair[0], tuple) else -1))
    loads = [(0.0, 0, index) for index in range(count)]
    owned = [[] for _ in range(count)]
    for item, weight in ordered:
        load, items, index = min(loads)
        owned[index].append(item)
        loads[index] = (load + weight, items + 1, index)
    return owned


def work_order(plan: list, shard, split: bool = True) -> list:
    """The work items of ``plan`` in the order ``shard`` (index, count) takes them
    (``Shares.order``). Depends only on the plan's entries (not their order) and the shard."""
    return Shares(plan, shard.count, split).order(shard.index)


def _weight(entry: dict) -> float:
    duration = entry.get("duration")
    return float(duration) if isinstance(duration, (int, float)) and duration > 0 else 0.0
