"""Videos written in parts: a long video's clips split into ranges that different writers
(shards) extract, each committed once, then assembled into one ordinary committed video.

Part ``k`` of ``P`` of a video of ``N`` clips holds clips ``[k*N//P, (k+1)*N//P)``
(``store.protocol.part_range``). A part attempt is an attempt like any other (``attempts/<name>/<attempt>``,
its arrays sized to its clips, ``times`` the whole video's), published by creating
``parts/<name>/<k>`` only if absent, as a video is published by creating ``commits/<name>``
(zarr_backend.py): one attempt per part wins, a loser drops only its own. Once all ``P`` parts
are committed, whoever sees it first (the writer of the last part, or any later writer)
*assembles* the video: a new attempt of its own for the whole video, the parts' arrays copied in
at their clip offsets (I/O only), committed as ``commits/<name>``; two assemblers race like two
writers of one video. Readers only ever see ``commits/``. Zarr (format 2) only: an HDF5 store is
one file written by one machine, and takes whole videos.

The assembled video holds exactly the parts' values, so it equals a one-process extraction bit
for bit, with one exception: a layer that overflows fp16 somewhere (stored in float32, see
writer.py) holds fp16-rounded values in the parts written without an overflow, where one
process would have kept float32 values after the first overflow.
"""
from __future__ import annotations

import numpy as np

from losa_tal import input_error

from .meta import RESERVED_INFO_KEYS, TIMES_KEY, array_key
from .names import encode_video_id
from .protocol import part_range
from .writer import VideoWriter

# Clips copied at a time by assembly, so a long video never has to fit in memory at once.
ASSEMBLY_BLOCK_CLIPS = 1024


def committed_parts(fs, video_ids) -> dict:
    """``{video_id: {k, ...}}`` of the committed parts of these videos (one listing)."""
    found = fs._backend.committed_parts()
    return {video_id: found[encode_video_id(video_id)] for video_id in video_ids
            if encode_video_id(video_id) in found}


def assemble(fs, video_id: str):
    """Commit ``video_id`` from its committed parts: True if this call committed it, False if
    it was committed already (or another assembler won), None while parts are missing."""
    if video_id in fs:
        return False
    backend = fs._backend
    documents = backend.part_documents(encode_video_id(video_id))
    parts, num_clips = _checked_parts(fs, video_id, documents)
    if len(documents) < parts:
        return None
    first = documents[0]
    info = {key: value for key, value in first["record"].items()
            if key not in RESERVED_INFO_KEYS}
    promoted = {layer for document in documents.values()
                for layer in document["record"].get("float32_layers", [])}
    times = np.asarray(backend.part_array(first, TIMES_KEY)[...])
    with VideoWriter(fs, video_id, num_clips, info,
                     float32_layers=[layer for layer in fs.stored_layers if layer in promoted]) \
            as writer:
        for part in range(parts):
            _copy_part(fs, writer, documents[part])
        return writer.commit(times)


def _copy_part(fs, writer, document: dict):
    first, stop = document["clips"]
    for layer in fs.stored_layers:
        array = fs._backend.part_array(document, array_key(layer))
        for start in range(first, stop, ASSEMBLY_BLOCK_CLIPS):
            end = min(stop, start + ASSEMBLY_BLOCK_CLIPS)
            writer.write(start, {layer: np.asarray(array[start - first:end - first])})


def part_progress(fs, video_id: str, parts: set):
    """``"3 of 5 parts committed"`` for a planned video with committed parts (``store
    verify``), from its first part's record of how many there are."""
    documents = fs._backend.part_documents(encode_video_id(video_id))
    total = next(iter(documents.values()), {}).get("parts", "?")
    return f"{len(parts)} of {total} parts committed"


def _checked_parts(fs, video_id, documents: dict) -> tuple[int, int]:
    """``(parts, num_clips)`` the parts agree on; a part record that disagrees (damaged or
    edited) is refused by name."""
    if not documents:
        return 1, 0
    first = documents[min(documents)]
    parts, num_clips = first.get("parts"), first["record"].get("num_clips")
    for part, document in documents.items():
        if not (isinstance(parts, int) and isinstance(num_clips, int) and 0 <= part < parts
                and document.get("parts") == parts and document.get("video_id") == video_id
                and document["record"].get("num_clips") == num_clips
                and document.get("clips") == list(part_range(part, parts, num_clips))):
            raise input_error(fs.path, f"video {video_id!r}: part record {part} disagrees with "
                              "the others (damaged or edited); delete parts/ of this video and "
                              "extract it again")
    return parts, num_clips
