"""Video ids as file and key names that can never leave the store.

Ids are arbitrary strings (unicode, ``/``, ``../x``). Every character outside ``[A-Za-z0-9._-]``
is percent-encoded as UTF-8 bytes, and so is a leading ``.`` or ``_`` (no ``.``/``..``, no hidden
or reserved names), so the name is a single, inert path component that decodes back to the id.
A name the store keeps beside the videos' (``RESERVED_PREFIXES``) gets its first character
encoded too, so no id can replace, or hide among, the store's own files. Ids of ordinary
datasets (``video_test_0000004``) keep their own name. A name that would exceed
``MAX_NAME`` characters is cut and suffixed with ``~`` and a hash of the id (``~`` never occurs
in an encoded name); such a name cannot be decoded, so the store keeps every id in the video's
attributes as well.
"""
import hashlib
import string

MAX_NAME = 200
HASHED_MARK = "~"
_SAFE = frozenset(string.ascii_letters + string.digits + "._-")
# Zarr's group metadata (zarr_backend.METADATA_FILE) and the temporaries written beside it, which
# sit in the videos folder; compared ignoring case, as a case-insensitive file system does.
RESERVED_PREFIXES = ("zarr.json",)


def encode_video_id(video_id: str) -> str:
    if not isinstance(video_id, str) or not video_id:
        raise ValueError(f"a video id must be a non-empty string, got {video_id!r}")
    parts = []
    for index, char in enumerate(video_id):
        if char in _SAFE and not (index == 0 and char in "._"):
            parts.append(char)
        else:
            parts.append("".join(f"%{byte:02X}" for byte in char.encode("utf-8", "surrogatepass")))
    name = "".join(parts)
    if name.lower().startswith(RESERVED_PREFIXES):
        name = f"%{ord(name[0]):02X}{name[1:]}"
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(video_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
        name = f"{name[:MAX_NAME - 17]}{HASHED_MARK}{digest}"
    return name


def decode_video_id(name: str) -> str:
    """The id a name was encoded from (or, for any other file name, its %XX escapes decoded)."""
    raw, index = bytearray(), 0
    while index < len(name):
        escape = name[index + 1:index + 3]
        if name[index] == "%" and len(escape) == 2 and all(c in string.hexdigits for c in escape):
            raw.append(int(escape, 16))
            index += 3
        else:
            raw += name[index].encode("utf-8", "surrogatepass")
            index += 1
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:  # not one of our names: keep it as it is
        return name
