"""Run extraction into a feature store: claim videos, decode them ahead, encode, publish.

One process (one shard: extract/shards.py) works like this:

    plan the videos in the store (once for all shards) --> walk this shard's work order:
    claim a video in the store --> DataLoader workers decode it into chunks (clips.py)
      --> clips of several videos fill a batch --> backbone.forward_taps (bf16 on a GPU)
      --> last-layer vector + each chosen layer pooled to K tokens (pooling.py)
      --> one copy to pinned host memory (GPU) --> the video's store writer, on a writer
          thread; commit once all its clips are written --> release it

The main process claims each video (an ``flock`` held until the video is published), so two
extractors on one store, or shards, never do the same video where locks work, and a killed
run's videos are free again for the resume; a video another shard's owner is presumably on is
left to it (``Shares.at_work``). Workers receive claimed videos through a queue: a worker that
finishes a long video takes the next one, whatever its length. Videos already complete in the
store are skipped; a video that cannot be decoded, or whose file is not the one the store
planned under its id, is recorded as failed, and the others go on.

With several shards on a Zarr store, a long video that the plan splits into parts is taken a
part at a time, like a video: claimed, decoded (its clip range only), encoded and committed as
a part; whoever commits its last part, or later finds all its parts committed, assembles it
(store/parts.py). A single shard, or an HDF5 store, extracts whole videos, and assembles only a
video whose parts other runs committed in full.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import losa_distributed
from extract.backbone import backbone_config, build_backbone, load_checkpoint
from extract.check import short_duration
from extract.clips import (VIDEO_EXTENSIONS, ClipChunks, backbone_frames, fault_point,
                           gather_clips, make_loader)
from extract.config import ExtractionConfig
from extract.decoding import stated_duration
from extract.pooling import check_grid, pool_tokens
from extract.shards import (Shard, Shares, item_video, launcher_shard, parts_of, planned,
                            source_problem)
from extract.workers import QueueFeed, SpawnContext, SpawnProcess
from losa_distributed import SHARED_MEMORY, shared_memory_free
from losa_tal import ConfigError, InputError, input_error
from store import LAST, FeatureStore


@dataclass
class ExtractionSettings:
    """One extraction run: its config (what a preset and the flags set; ``commands.extract``
    builds it) and what is worked out for the run itself. Problems with a config value are
    ConfigErrors naming its key; the command line names the flag or preset file."""

    config: ExtractionConfig
    videos: list  # [(video_id, path)], this run's candidates (all shards)
    shard: Shard | None = None  # None: the launcher's (extract.shards.launcher_shard)
    storage_options: dict | None = None  # for a URL store's file system (store/urls.py)
    compile: bool = False  # torch.compile the backbone
    backbone_source: str = "backbone"  # where the backbone spec came from, for messages
    # {video_id: seconds} from the annotations: a video that decodes much shorter is reported
    # (a download cut short in a container without an index decodes up to the cut, silently).
    expected_durations: dict = field(default_factory=dict)


@dataclass
class ExtractionSummary:
    done: list = field(default_factory=list)  # video ids published by this process
    parts: list = field(default_factory=list)  # parts (video_id, k) published by this process
    # The next three hold work items: video ids, or parts (video_id, k) of split videos.
    already: list = field(default_factory=list)  # complete in the store before we got to them
    taken: list = field(default_factory=list)  # claimed by another extractor at the time
    # unfinished in another shard's own share, where its owner presumably is (Shares.at_work)
    left: list = field(default_factory=list)
    failed: dict = field(default_factory=dict)  # {video_id: reason}
    warnings: dict = field(default_factory=dict)  # {video_id: problem}, extracted all the same
    clips: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0  # time inside the backbone (synchronised), for the benchmark

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0


# -- choosing videos ----------------------------------------------------------------------------
def find_videos(folder, ids=None) -> tuple[list, list]:
    """``([(video_id, path)], missing_ids)`` for the video files directly in ``folder``.

    Without ``ids`` every file with a video extension is taken, its id the file name without the
    extension. With ``ids`` (from an annotation file) only those, matched by file name or by
    ``v_<id>`` (ActivityNet's file names); ids without a file are returned as missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise input_error(folder, "video folder not found")
    by_stem = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in VIDEO_EXTENSIONS and _is_usable(path):
            stem = _text_id(path)
            if stem in by_stem:
                raise input_error(folder, f"two files for video {stem!r}: "
                                  f"{by_stem[stem].name} and {path.name}; keep one")
            by_stem[stem] = path
    if ids is None:
        if not by_stem:
            raise input_error(folder, f"no video files ({', '.join(VIDEO_EXTENSIONS)})")
        return sorted(by_stem.items()), []
    found, missing = [], []
    for video_id in ids:
        path = by_stem.get(video_id) or by_stem.get(f"v_{video_id}")
        (found.append((video_id, path)) if path else missing.append(video_id))
    if not found:
        raise input_error(folder, f"none of the {len(missing)} annotated videos is here "
                          f"(e.g. {missing[0]!r})" if missing else "no annotated videos")
    return sorted(found), missing


def _is_usable(path: Path) -> bool:
    """A video file we can take; a warning names each entry with a video extension that is not
    one (it used to be passed over without a word)."""
    problem = None
    if path.is_symlink() and not path.exists():
        problem = "a symbolic link to nothing"
    elif path.is_dir():
        problem = "a directory"
    elif not path.is_file():
        problem = "not a regular file"
    if problem:
        warnings.warn(f"{_shown(path)}: skipped: {problem}", stacklevel=3)
    return problem is None


def _text_id(path: Path) -> str:
    """The video id: the file name without its extension. A name that is not UTF-8 would give
    an id no JSON file can hold (lone surrogates); its bytes are escaped instead (``caf\\xe9``
    for Latin-1 ``café``), with a warning saying so."""
    try:
        path.stem.encode("utf-8")
        return path.stem
    except UnicodeEncodeError:
        video_id = _shown(Path(path.stem))
        warnings.warn(f"{_shown(path)}: the file name is not UTF-8; its video id is "
                      f"{video_id!r}", stacklevel=3)
        return video_id


def _shown(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def annotated_durations(path, subset=None) -> dict:
    """``{video_id: duration in seconds or None}`` of an annotation file (ActivityNet layout),
    all subsets unless one is named."""
    from evaluation import load_annotations

    annotations = load_annotations(path)
    names = [subset] if subset is not None or not annotations.subsets else annotations.subsets
    return {vid: video.duration for name in names
            for vid, video in annotations.videos(name).items()}


# -- the model ----------------------------------------------------------------------------------
class Encoder:
    """The frozen backbone and what is kept of it per clip: the last-layer vector and K pooled
    tokens of each chosen block."""

    def __init__(self, settings: ExtractionSettings, device: torch.device):
        config = settings.config
        protocol = config.protocol
        # The clip geometry is the protocol's; record it in the backbone's own arguments too.
        self.config = backbone_config(config.backbone, source=settings.backbone_source,
                                      img_size=protocol.img_size, all_frames=protocol.clip_len)
        # bf16 weights on CUDA: autocast would otherwise re-cast every fp32 weight each forward.
        # LayerNorms still compute in fp32 (autocast), and so does the stored feature (_pool).
        dtype = weight_dtype(device)
        if config.checkpoint:  # built empty, then given the checkpoint's tensors on the device
            with torch.device("meta"):
                model = build_backbone(self.config, source=settings.backbone_source)
            self.sha256 = load_checkpoint(model, config.checkpoint, device, dtype)
        else:  # random weights, drawn on the CPU: one seed gives the same ones on any device
            torch.manual_seed(config.seed)
            model = build_backbone(self.config, source=settings.backbone_source)
            self.sha256 = None
        self.layers = model.block_indices(config.layers)
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError("layers", f"a block is listed twice: {config.layers}")
        self.grid = model.token_grid_for(protocol.clip_len, protocol.img_size, protocol.img_size)
        self.tokens = tuple(config.tokens)
        if self.layers:
            check_grid(self.tokens, self.grid)
        self.feature_dim = model.embed_dim
        self.device = device
        self.model = model.eval().requires_grad_(False).to(device, dtype=dtype)
        self._taps = torch.compile(self.model.forward_taps) if settings.compile \
            else self.model.forward_taps

    def backbone_record(self, config: ExtractionConfig) -> dict:
        preset = config.backbone if isinstance(config.backbone, str) else \
            config.backbone.get("preset")
        checkpoint = None if config.checkpoint is None else \
            {"file": Path(config.checkpoint).name, "sha256": self.sha256}
        return {"preset": preset, "kwargs": self.config, "checkpoint": checkpoint,
                "random_init_seed": None if config.checkpoint else config.seed}

    @torch.inference_mode()
    def __call__(self, clips: torch.Tensor) -> dict:
        """Clips [B, 3, T, S, S] -> {LAST: float32 [B, D], block: float32 [B, K, D]} (numpy)."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" \
            else contextlib.nullcontext()
        with autocast:
            pooled, taps = self._taps(clips, self.layers)
            features = {LAST: pooled.float()}
            for layer, tokens in zip(self.layers, taps):
                features[layer] = pool_tokens(tokens, self.grid, self.tokens)
        return to_host(features)


def to_host(features: dict) -> dict:
    """Float32 device tensors -> numpy arrays. From a GPU: one copy of the whole batch into
    pinned memory (rather than one synchronous pageable copy per layer), then views of it."""
    first = next(iter(features.values()))
    if first.device.type == "cpu":
        return {layer: values.numpy() for layer, values in features.items()}
    flat = torch.cat([values.flatten(1) for values in features.values()], dim=1)
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    torch.cuda.current_stream(flat.device).synchronize()
    arrays, offset = {}, 0
    for layer, values in features.items():
        width = values[0].numel()
        arrays[layer] = host[:, offset:offset + width].reshape(values.shape).numpy()
        offset += width
    return arrays


def shared_memory_needed(config: ExtractionConfig) -> int:
    """Bytes of frames the decoding workers keep in shared memory at most: each has
    ``PREFETCH_CHUNKS`` chunks waiting plus the one it is filling; a chunk is the distinct
    float32 frames of ``batch_size`` consecutive clips."""
    from extract.clips import PREFETCH_CHUNKS

    protocol = config.protocol
    frames = min((config.batch_size - 1) * protocol.clip_stride * protocol.frame_interval
                 + protocol.span, config.batch_size * protocol.clip_len)
    chunk = frames * 3 * protocol.img_size ** 2 * 4
    return config.num_workers * (PREFETCH_CHUNKS + 1) * chunk


def check_shared_memory(config: ExtractionConfig) -> None:
    """Refuse, in one line, to start workers whose chunks /dev/shm cannot hold (Docker gives a
    container 64 MB), rather than let them die of SIGBUS mid-video. Every process of the node
    (torchrun's LOCAL_WORLD_SIZE) runs as many workers. The advice names the settings in
    backticks; the command line names their flags (losa_tal.flag_errors)."""
    processes = losa_distributed.launch().local_world_size
    free, needed = shared_memory_free(), processes * shared_memory_needed(config)
    if free is not None and free < needed:
        workers = f"{processes} processes x {config.num_workers}" if processes > 1 else \
            f"{config.num_workers}"
        raise input_error(SHARED_MEMORY, f"{free / 2**20:.0f} MB free, but {workers}"
                          f" decoding workers can hold {needed / 2**20:.0f} MB of frames there; "
                          "give it more (docker run --shm-size=8g, or mount a larger tmpfs) or "
                          "lower `num_workers` or `batch_size`")


def weight_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def compute_record(device: torch.device) -> dict:
    """What a video's features were computed on and in, kept in its store record."""
    name = "cpu" if device.type == "cpu" else \
        f"{device.type} ({torch.cuda.get_device_name(device)})"
    return {"compute_device": name, "compute_dtype": str(weight_dtype(device)).split(".")[-1]}


def check_compute_dtype(config: ExtractionConfig, device: torch.device,
                        storage_options=None) -> None:
    """Refuse, in one line and before the backbone is built, to add features computed in
    another dtype (bf16 on a GPU, fp32 on the CPU) to a store: one store, one kind of feature.
    A store's videos agree with each other, so its first video speaks for all."""
    try:
        store = FeatureStore.open(config.store, storage_options)
    except InputError:
        return  # no store yet (or an unreadable one, which creating it reports)
    with store:
        first = next(iter(store.videos()), None)
        recorded = None if first is None else store.video_info(first)
    ours = compute_record(device)
    if recorded is not None and recorded.get("compute_dtype", ours["compute_dtype"]) != \
            ours["compute_dtype"]:
        raise input_error(store.path, f"holds features computed in {recorded['compute_dtype']} "
                          f"on {recorded.get('compute_device')}; this run would compute them in "
                          f"{ours['compute_dtype']} on {ours['compute_device']}: extract on "
                          "the same kind of device (`device`), or into another store")


def pick_device(name: str) -> torch.device:
    """The extraction device, which becomes the process's current device (``use_device``:
    the DataLoader's pin thread and a torchrun rank's allocations then use its own GPU)."""
    return losa_distributed.use_device(_named_device(name))


def _named_device(name: str) -> torch.device:
    if name == "auto":
        return losa_distributed.local_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError("device", f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} requested but no CUDA device is available")
    if device.type == "cuda" and device.index is None:  # "cuda": this rank's GPU
        device = losa_distributed.local_gpu()
    return device


def store_meta(encoder: Encoder, config: ExtractionConfig) -> dict:
    return {"backbone": encoder.backbone_record(config),
            "protocol": config.protocol.to_dict(),
            "layers": encoder.layers,
            "tokens": list(encoder.tokens) if encoder.layers else None,
            "feature_dim": encoder.feature_dim,
            "dtype": "float16",
            # Where the checkpoint was: an append or detect finds it there (not compared).
            "checkpoint_path": str(Path(config.checkpoint).absolute()) if config.checkpoint
            else None}


# -- claiming and writing videos ----------------------------------------------------------------
# Claimed videos waiting per decoding worker, so a worker that finishes one finds the next.
VIDEOS_PER_WORKER = 2


class ShardWork:
    """This shard's view of the store's plan: its work order, as ``(item, path)`` (an item is a
    video id or a part ``(video_id, k)``, extract/shards.py; the path this machine sees), each
    video's planned source and parts, and every shard's share."""

    def __init__(self, store: FeatureStore, settings: ExtractionSettings, shard: Shard):
        expected = settings.expected_durations
        self.shard, self.paths = shard, dict(settings.videos)
        self.entries = planned(store, settings.videos, shard,
                               lambda vid, path: expected.get(vid) or stated_duration(path))
        self.parts = {vid: parts_of(entry) for vid, entry in self.entries.items()}
        self.split = shard.count > 1 and store.takes_parts  # else whole videos (module doc)
        self.shares = Shares(list(self.entries.values()), shard.count, self.split)
        self.order = [(item, self.paths[item_video(item)])
                      for item in self.shares.order(shard.index)]
        self._own = set(self.shares.owned[shard.index])
        self.depth = max(1, VIDEOS_PER_WORKER * settings.config.num_workers)  # held at once

    @property
    def split_videos(self) -> list:
        """The videos planned in parts (all of them: a single shard may assemble one)."""
        return [vid for vid, parts in self.parts.items() if parts > 1]

    def owns(self, item) -> bool:
        return item in self._own

    def source_problem(self, video_id) -> str | None:
        return source_problem(self.entries[video_id], self.paths[video_id])

    def source(self, video_id) -> dict | None:
        """What identifies the video's file, for its record: the plan's (its file was checked
        against it before it was claimed)."""
        return self.entries[video_id].get("source")


class Claims:
    """Hands out work items (videos, or parts of split videos) claimed in the store, one at a
    time, in this shard's work order, and holds each claim until the item is finished
    (published or failed)."""

    def __init__(self, store: FeatureStore, work: "ShardWork", summary: ExtractionSummary):
        self.store, self.work, self.summary = store, work, summary
        self._pending = iter(work.order)
        self._held = {}  # item -> ExitStack holding its claim
        self.exhausted = False

    def next(self):
        """The next item this process now owns, as ``(video_id, path)`` or, for a part,
        ``(video_id, path, (k, parts))``; None when none is left."""
        committed = set(self.store.videos())  # one listing
        done = committed | self._committed_parts(committed)
        busy = self.work.shares.at_work(done, self.work.shard.index, self.work.depth)
        for item, path in self._pending:
            video_id = item_video(item)
            if video_id in self.summary.failed:
                continue
            # A file that is not the planned one is refused; each committed video's file is
            # checked by one shard, its owner (a check may read 2 MiB of it).
            if (video_id not in committed or self.work.owns(item)) and \
                    self._refused(video_id):
                continue
            # A split video whose parts are all committed (by this run or another, which may have
            # died before assembling it) is assembled by whoever finds them, a single shard too.
            if video_id not in committed and self.work.parts[video_id] > 1 and \
                    (item in done or item == video_id) and \
                    assemble(self.store, video_id, self.work.parts[video_id],
                             self.summary) is not None:
                committed.add(video_id)
            if video_id in committed or item in done:  # finished: skipped without a claim,
                self.summary.already.append(item)  # which a user who may only read cannot take
                continue
            if item in busy:
                self.summary.left.append(item)
                continue
            stack = contextlib.ExitStack()
            if not stack.enter_context(self.store.claim(*_claimed(item))):
                stack.close()
                self.summary.taken.append(item)
            elif video_id in self.store or \
                    (item != video_id and item in self._committed_parts(set())):
                stack.close()
                self.summary.already.append(item)
            else:
                self._held[item] = stack
                part = () if item == video_id else ((item[1], self.work.parts[video_id]),)
                return (video_id, str(path), *part)
        self.exhausted = True
        return None

    def _committed_parts(self, committed: set) -> set:
        """The committed parts ``(video_id, k)`` of split videos not committed (one listing;
        none when the plan splits no video)."""
        split = [vid for vid in self.work.split_videos if vid not in committed]
        if not split:
            return set()
        return {(vid, part) for vid, parts in self.store.committed_parts(split).items()
                for part in parts}

    def _refused(self, video_id) -> bool:
        problem = self.work.source_problem(video_id)
        if problem:
            self.summary.failed[video_id] = problem
            tqdm.write(f"skipped video {video_id!r}: {problem}", file=sys.stderr)
        return problem is not None

    def __iter__(self):  # the in-process feed (no DataLoader workers): claim as decoding needs
        while (item := self.next()) is not None:
            yield item

    @property
    def held(self) -> int:
        return len(self._held)

    def held_ids(self) -> list:
        """The items held, as text (``long (part 2)`` for a part), sorted."""
        return sorted(item if item == item_video(item) else f"{item[0]} (part {item[1]})"
                      for item in self._held)

    def release(self, item):
        self._held.pop(item).close()

    def release_all(self):
        for item in list(self._held):
            self.release(item)


def _claimed(item) -> tuple:
    """``FeatureStore.claim``'s arguments for a work item."""
    return item if isinstance(item, tuple) else (item,)


def item_of(chunk: dict):
    """The work item a decoded chunk (or failure) belongs to."""
    part = chunk.get("part")
    return chunk["video"] if part is None else (chunk["video"], part[0])


def assemble(store: FeatureStore, video_id: str, parts: int,
             summary: ExtractionSummary) -> bool | None:
    """Commit a video planned in ``parts`` parts from them if all are committed (True if this
    process did, False if another one did; ``FeatureStore.assemble``); None while some are
    missing."""
    if len(store.committed_parts([video_id]).get(video_id, ())) < parts:
        return None
    fault_point("assemble")
    assembled = store.assemble(video_id)
    if assembled:
        summary.done.append(video_id)
    return assembled


class OpenVideo:
    """A video (or a part of one) being written: its store writer and how many of its clips
    are handed to it.

    The writes run in order on the run's one store-writer thread, so that the main thread feeds
    the backbone meanwhile; ``commit`` and ``discard`` wait for them first, and a write that
    failed raises in the main thread (at the next write or at the commit).
    """

    MAX_PENDING = 4  # batches of features waiting for the writer thread, per video

    def __init__(self, store, chunk, writes: ThreadPoolExecutor, record: dict):
        first, stop = chunk["clips"]
        self.size = stop - first
        self.times = chunk["times"]
        info = {**chunk["info"], **record}
        part = chunk["part"]
        self.writer = store.video_writer(chunk["video"], chunk["num_clips"], info) \
            if part is None else store.part_writer(chunk["video"], *part, chunk["num_clips"], info)
        self.written = 0
        self.writes, self.pending = writes, []

    def write(self, start, features) -> bool:
        """Queue clips for writing; True once the whole video (or part) is queued."""
        while self.pending and (self.pending[0].done() or len(self.pending) >= self.MAX_PENDING):
            self.pending.pop(0).result()  # raises what the write raised
        self.pending.append(self.writes.submit(self._write, start, features))
        self.written += len(features[LAST])
        return self.written == self.size

    def _write(self, start, features):
        self.writer.write(start, features)
        fault_point("write")

    def commit(self) -> bool:
        for pending in self.pending:
            pending.result()
        self.pending = []
        return self.writer.commit(self.times)

    def discard(self):
        for pending in self.pending:
            pending.exception()  # waits; the video is dropped whatever went wrong
        self.pending = []
        self.writer.discard()




# -- the run ------------------------------------------------------------------------------------
class Extraction:
    """One process's extraction run; see the module docstring."""

    def __init__(self, settings: ExtractionSettings, store: FeatureStore, encoder: Encoder,
                 summary: ExtractionSummary, progress, work: "ShardWork"):
        self.settings, self.store, self.encoder, self.work = settings, store, encoder, work
        self.config = settings.config
        self.summary, self.progress = summary, progress
        self.started = time.perf_counter()
        self.open = {}  # video_id -> OpenVideo
        self.writes = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self.batch = []  # [(item, first_clip, clips)] waiting for the backbone
        self.batch_clips = 0

    def run(self, claims: Claims):
        config = self.config
        workers = config.num_workers
        pin = self.encoder.device.type == "cuda"
        if workers:
            feed = SpawnContext().Queue()
            dataset = ClipChunks(QueueFeed(feed), config.protocol, config.batch_size)
            # Two claimed videos per worker, so a worker that finishes one finds the next waiting;
            # each video finished (published or failed) is replaced, and an idle worker gets one.
            self._feed = lambda: self._refill(claims, feed, VIDEOS_PER_WORKER * workers)
            self._feed()
        else:
            dataset = ClipChunks(claims, config.protocol, config.batch_size)
            self._feed = lambda: None
        for item in self._items(make_loader(dataset, workers, pin), claims):
            if item["kind"] == "idle":  # only with workers: one more video for the idle one
                self._refill(claims, feed, claims.held + 1)
            elif item["kind"] == "failed":
                self._fail(item, claims)
            else:
                self._add_chunk(item, claims)
        self._encode_batch(claims)  # the tail
        if self.open:  # cannot happen unless a worker lost a chunk; never publish a partial video
            raise RuntimeError(f"videos left incomplete: {sorted(self.open)}")

    @staticmethod
    def _items(loader, claims):
        """The loader's items; a worker that died (killed, out of memory, or crashed inside the
        decoder) becomes one clear error instead of the DataLoader's traceback. A run that
        stops early (an error, Ctrl-C, SIGTERM) kills its workers at once: their work is lost
        anyway, and the DataLoader's own shutdown waits up to 5 s for each worker still
        starting (17 s for two on a loaded machine)."""
        try:
            items = iter(loader)  # starts the workers (a stop may come while it does)
            while True:
                try:
                    yield next(items)
                except StopIteration:
                    return
                except RuntimeError as err:
                    if "DataLoader worker" not in str(err):
                        raise
                    raise ConfigError("num_workers", "a decoding worker died (killed, out of "
                                      "memory, or crashed in the decoder) while decoding one "
                                      f"of: {', '.join(claims.held_ids())}; nothing partial "
                                      "was kept, run again to resume (set to 0 to see whether "
                                      "one video crashes the decoder)") from None
        except BaseException:  # GeneratorExit too: the run loop stopped on an exception
            _kill_workers([child for child in multiprocessing.active_children()
                           if isinstance(child, SpawnProcess)])  # the DataLoader's workers
            raise

    def _refill(self, claims, feed, depth):
        """Claim videos for the workers until ``depth`` are held; STOP them when none is left."""
        while not claims.exhausted and claims.held < depth:
            video = claims.next()
            if video is not None:
                feed.put(video)
                continue
            for _ in range(self.config.num_workers):
                feed.put(QueueFeed.STOP)
        self._tick()

    def _add_chunk(self, chunk, claims):
        video, key = chunk["video"], item_of(chunk)
        if key not in self.open:
            self.open[key] = OpenVideo(self.store, chunk, self.writes,
                                       {**compute_record(self.encoder.device),
                                        "source": self.work.source(video)})
            self._check_duration(video, chunk["info"]["duration"])
            if self.open[key].size == 0:  # a part of no clips (fewer clips than parts)
                self._publish(key, claims)
                return
        device = self.encoder.device
        frames = backbone_frames(chunk["frames"].to(device, non_blocking=True),
                                 self.config.protocol)
        clips = gather_clips(frames, chunk["index"].to(device, non_blocking=True))
        self.batch.append((key, chunk["first_clip"], clips))
        self.batch_clips += len(clips)
        while self.batch_clips >= self.config.batch_size:
            self._encode_batch(claims)

    def _encode_batch(self, claims):
        """Encode up to batch_size waiting clips and hand each video (or part) its features."""
        size = self.config.batch_size
        pieces, taken = [], 0
        while self.batch and taken < size:
            item, first, clips = self.batch.pop(0)
            if taken + len(clips) > size:  # split: the rest waits for the next batch
                cut = size - taken
                self.batch.insert(0, (item, first + cut, clips[cut:]))
                clips = clips[:cut]
            pieces.append((item, first, clips))
            taken += len(clips)
        self.batch_clips -= taken
        if not pieces:
            return
        started = time.perf_counter()
        features = self.encoder(torch.cat([clips for _, _, clips in pieces]))
        self.summary.compute_seconds += time.perf_counter() - started
        self.summary.clips += taken
        offset = 0
        for item, first, clips in pieces:
            count = len(clips)
            own = {layer: values[offset:offset + count] for layer, values in features.items()}
            offset += count
            if self.open[item].write(first, own):
                self._publish(item, claims)
        self._tick()

    def _publish(self, item, claims):
        opened = self.open.pop(item)
        fault_point("commit")
        if not opened.commit():  # another writer published it first (only without claims)
            self.summary.already.append(item)
        elif isinstance(item, tuple):
            self.summary.parts.append(item)
        else:
            self.summary.done.append(item)
        fault_point("published")
        if isinstance(item, tuple):  # its last part: the video is assembled here
            assemble(self.store, item[0], self.work.parts[item[0]], self.summary)
        claims.release(item)
        self._feed()

    def _fail(self, failure, claims):
        video, reason, item = failure["video"], failure["error"], item_of(failure)
        opened = self.open.pop(item, None)
        if opened is not None:  # decoding broke mid-video: drop what was written
            opened.discard()
        self.batch = [part for part in self.batch if part[0] != item]
        self.batch_clips = sum(len(part[2]) for part in self.batch)
        self.summary.failed[video] = reason
        self.store.record_failure(video, reason)
        tqdm.write(f"skipped video {video!r}: {reason}", file=sys.stderr)
        claims.release(item)
        self._feed()

    def _check_duration(self, video, decoded):
        if video in self.summary.warnings:  # another part of it
            return
        problem = short_duration(decoded, self.settings.expected_durations.get(video))
        if problem:
            problem += "; extracted as decoded"
            self.summary.warnings[video] = problem
            tqdm.write(f"warning: video {video!r} {problem}", file=sys.stderr)

    def abandon(self):
        """At the end, or after an error: drop the unfinished videos (nothing partial is ever
        published) and stop the writer thread."""
        for opened in self.open.values():
            opened.discard()
        self.open.clear()
        self.writes.shutdown(wait=True)

    def _tick(self):
        if self.progress is None:
            return
        summary = self.summary
        finished = len(summary.done) + len(summary.parts) + len(summary.already) + \
            len(summary.taken) + len(summary.left) + len(summary.failed)
        elapsed = time.perf_counter() - self.started
        self.progress.set_postfix(clips_s=f"{summary.clips / max(elapsed, 1e-9):.1f}",
                                  failed=len(summary.failed), refresh=False)
        self.progress.update(finished - self.progress.n)


def _kill_workers(workers) -> None:
    """SIGKILL the workers and reap them. Meanwhile SIGCHLD is ignored: PyTorch's handler would
    turn a killed worker into a "DataLoader worker is killed by signal" error in the middle of
    the clean-up (signal handlers can be changed in the main thread only)."""
    alive = [worker for worker in workers if worker.is_alive()]
    if not alive:
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL) if main else None
    try:
        for worker in alive:
            worker.kill()
        for worker in alive:
            worker.join()
    finally:
        if main and previous is not None:  # None: a handler not set from Python, left as is
            signal.signal(signal.SIGCHLD, previous)


def run_extraction(settings: ExtractionSettings, show_progress: bool = True,
                   store_ready=None) -> ExtractionSummary:
    """Extract ``settings.videos`` into the store, as one shard; returns what happened.

    ``store_ready(store)`` is called once the store is created or opened (tests use it).
    """
    config = settings.config
    config.check()  # a config built in code has not been through the loader
    if config.num_workers:  # before anything is built or written
        check_shared_memory(config)
    device = pick_device(config.device)
    if config.device == "auto":  # a rank without CUDA would compute in another dtype
        losa_distributed.agree_on_device(device)
    check_compute_dtype(config, device, settings.storage_options)
    encoder = Encoder(settings, device)
    print(losa_distributed.device_line(device, "extracting"), file=sys.stderr)
    shard = settings.shard or launcher_shard()
    summary = ExtractionSummary()
    started = time.perf_counter()
    with FeatureStore.create(config.store, store_meta(encoder, config), format=config.format,
                             storage_options=settings.storage_options) as store:
        if store_ready is not None:
            store_ready(store)
        work = ShardWork(store, settings, shard)
        progress = tqdm(total=len(work.order), unit="video", disable=not show_progress,
                        desc=f"extract shard {shard.index}" if shard.count > 1 else "extract")
        extraction = Extraction(settings, store, encoder, summary, progress, work)
        claims = Claims(store, work, summary)
        try:
            extraction.run(claims)
        finally:
            extraction.abandon()
            claims.release_all()
            progress.close()
    summary.seconds = time.perf_counter() - started
    return summary


def format_summary(summary: ExtractionSummary, missing=()) -> str:
    """The lines printed at the end of a run."""
    parts = f" and {len(summary.parts)} parts of long videos" if summary.parts else ""
    lines = [f"extracted {len(summary.done)} videos{parts} ({summary.clips} clips, "
             f"{summary.clips_per_second:.1f} clips/s); {len(summary.already)} already in the "
             f"store; {len(summary.taken)} taken by another extractor; "
             + (f"{len(summary.left)} left to the shards they belong to; " if summary.left
                else "") + f"{len(summary.failed)} failed"]
    lines += [f"  failed: {reason}" for _, reason in sorted(summary.failed.items())]
    lines += [f"  warning: video {vid!r} {problem}" for vid, problem in
              sorted(summary.warnings.items())]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        lines.append(f"  {len(missing)} annotated videos have no file in the folder: {shown}")
    return "\n".join(lines)

