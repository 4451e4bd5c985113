"""The feature store's API on real stores on disk: round trips in every format, the layout and its
chunking, fp16 overflow, refusals of bad writes and of stores whose metadata lies, hostile ids.
"""
import json
import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.stores import (D, HOSTILE_IDS, K, LAYERS, as_stored, assert_video_equals, clip_times,
                            edit_record, files_under, make_meta, video_features, video_info,
                            write_video)
from helpers.stores import video_dir as committed_dir
from losa_tal import InputError
from store import LAST, FeatureStore
from store.names import MAX_NAME, decode_video_id, encode_video_id
from store.verify import verify_store
from store.writer import chunk_clips


@pytest.fixture(params=["zarr", "hdf5", "url"])
def location(request, tmp_path):
    """A new store's location: a Zarr directory, an HDF5 file, or a Zarr store by file:// URL."""
    return {"zarr": str(tmp_path / "features.zarr"), "hdf5": str(tmp_path / "features.h5"),
            "url": (tmp_path / "features_url.zarr").as_uri()}[request.param]


# -- round trips ------------------------------------------------------------------------------

def test_round_trip_in_chunks_with_metadata(location):
    fs = FeatureStore.create(location, make_meta())
    features = video_features(0, 70)
    with fs.video_writer("video_b", 70, video_info(70)) as writer:
        assert "video_b" not in fs
        writer.write(0, {LAST: features[LAST][:30], 2: features[2][:30]})
        writer.write(30, {LAST: features[LAST][30:], 2: features[2][30:]})
        writer.write(0, {5: features[5]})
        assert fs.videos() == []  # nothing visible before commit
        assert writer.commit(clip_times(70))
    other = write_video(fs, "video_a", 1, 5)

    reader = FeatureStore.open(location)
    assert reader.format == ("hdf5" if location.endswith(".h5") else "zarr")
    assert reader.videos() == ["video_a", "video_b"]
    assert "video_b" in reader and "video_c" not in reader
    assert reader.layers == LAYERS and reader.tokens == (1, 2, 2) and reader.num_tokens == K
    assert reader.feature_dim == D and reader.meta["dtype"] == "float16"
    assert reader.meta["format_version"] == (1 if reader.format == "hdf5" else 2)
    assert reader.meta["created"].endswith("+00:00")
    assert_video_equals(reader, "video_b", features)
    assert_video_equals(reader, "video_a", other)
    info = reader.video_info("video_b")
    assert info["num_clips"] == 70 and info["fps"] == 30.0 and info["float32_layers"] == []
    assert info["num_frames"] == 292 and info["duration"] == pytest.approx(292 / 30)


def test_read_a_window_of_some_layers(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    features = write_video(fs, "v", 0, 50)
    window = fs.read("v", layers=(LAST, 5), start=10, stop=20)
    assert sorted(window, key=str) == [5, LAST]
    np.testing.assert_array_equal(window[5], as_stored(features[5][10:20]))
    assert window[LAST].shape == (10, D) and fs.read("v", [2], 50, 50)[2].shape == (0, K, D)
    with pytest.raises(ValueError, match="outside"):
        fs.read("v", [LAST], 40, 51)
    with pytest.raises(InputError, match="holds no layer 3"):
        fs.read("v", [3])
    with pytest.raises(ValueError, match="block index"):
        fs.read("v", ["layer_2"])
    with pytest.raises(InputError, match="no complete video 'w'"):
        fs.read("w")


def test_float32_store_keeps_values_exactly(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.h5", make_meta(dtype="float32"))
    features = write_video(fs, "v", 3, 9)
    assert fs.format == "hdf5"
    np.testing.assert_array_equal(fs.read("v", [5])[5], features[5])


def test_last_layer_only_store(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta(layers=[], tokens=None))
    write_video(fs, "v", 0, 4)
    assert fs.tokens is None and fs.num_tokens == 0
    assert list(FeatureStore.open(tmp_path / "s.zarr").read("v")) == [LAST]


# -- layout and chunking ----------------------------------------------------------------------

def test_chunk_sizes_documented_for_vit_g():
    assert chunk_clips(1408 * 2) == 256  # last layer, fp16
    assert chunk_clips(4 * 1408 * 2) == 64  # K = 4 tokens
    assert chunk_clips(8) == 1024 and chunk_clips(10 ** 9) == 16  # clamped


def test_a_window_read_touches_only_its_chunks(tmp_path):
    """Delete every chunk outside clips 1100:1200 of the last layer, and all chunks of layer 2:
    the window still reads exactly; reading what was deleted is refused, not zeros."""
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    features = write_video(fs, "v", 0, 3000)
    video_dir = committed_dir(tmp_path / "s.zarr", "v")
    array_meta = json.loads((video_dir / "last" / "zarr.json").read_text())
    assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [1024, D]
    chunk_dir = video_dir / "last" / "c"
    assert sorted(os.listdir(chunk_dir)) == ["0", "1", "2"]  # chunk index along T
    shutil.rmtree(chunk_dir / "0")
    shutil.rmtree(chunk_dir / "2")
    shutil.rmtree(video_dir / "layer_2" / "c")

    reader = FeatureStore.open(tmp_path / "s.zarr")
    window = reader.read("v", [LAST, 5], 1100, 1200)
    np.testing.assert_array_equal(window[LAST], as_stored(features[LAST][1100:1200]))
    np.testing.assert_array_equal(window[5], as_stored(features[5][1100:1200]))
    with pytest.raises(InputError, match="NaN or inf"):
        reader.read("v", [LAST], 1000, 1100)
    with pytest.raises(InputError, match="layer 2"):
        reader.read("v", [2], 1100, 1200)


def test_no_pickle_and_json_metadata(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.h5", make_meta())
    write_video(fs, "v", 0, 3)
    with h5py.File(tmp_path / "s.h5", "r") as handle:
        assert json.loads(handle.attrs["losa_tal"])["feature_dim"] == D
        group = handle["videos/v"]
        assert json.loads(group.attrs["record"])["num_clips"] == 3
        assert bool(group.attrs["complete"])
        assert group["layer_5"].fletcher32 and group["layer_5"].chunks[1:] == (K, D)
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    write_video(fs, "v", 0, 3)
    root = json.loads((tmp_path / "s.zarr" / "zarr.json").read_text())
    assert root["attributes"]["losa_tal"]["layers"] == LAYERS


# -- fp16 overflow ----------------------------------------------------------------------------

@pytest.mark.parametrize("store_format", ["zarr", "hdf5"])
def test_fp16_overflow_switches_that_layer_to_float32(tmp_path, store_format):
    fs = FeatureStore.create(tmp_path / "s", make_meta(), format=store_format)
    features = video_features(0, 40)
    features[5][33, 1, 2] = 1e6  # beyond fp16: would be stored as inf
    features[5][2, 0, 0] = -70000.0
    with pytest.warns(UserWarning, match="layer 5 has values beyond the float16 range"):
        with fs.video_writer("v", 40, video_info(40)) as writer:
            writer.write(0, {key: values[:20] for key, values in features.items()})
            writer.write(20, {key: values[20:] for key, values in features.items()})
            writer.commit(clip_times(40))
    reader = FeatureStore.open(tmp_path / "s")
    assert reader.video_info("v")["float32_layers"] == [5]
    read = reader.read("v")
    np.testing.assert_array_equal(read[5], features[5])  # float32 throughout, no inf
    np.testing.assert_array_equal(read[2], as_stored(features[2]))
    assert verify_store(reader).bad == {}


# -- refusals of bad writes -------------------------------------------------------------------

def test_bad_writes_are_refused(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    features = video_features(0, 10)
    with fs.video_writer("v", 10, video_info(10)) as writer:
        with pytest.raises(ValueError, match="shape"):
            writer.write(0, {LAST: np.zeros((10, D + 1))})
        with pytest.raises(ValueError, match="shape"):
            writer.write(0, {2: np.zeros((10, K + 1, D))})
        with pytest.raises(ValueError, match="within 10 clips"):
            writer.write(5, {LAST: np.zeros((6, D))})
        with pytest.raises(ValueError, match="floating-point"):
            writer.write(0, {LAST: np.zeros((10, D), dtype=np.int64)})
        with pytest.raises(ValueError, match="not one of the store's layers"):
            writer.write(0, {3: np.zeros((10, K, D))})
        writer.write(0, {LAST: features[LAST], 2: features[2]})
        with pytest.raises(ValueError, match="nothing written yet for 5"):
            writer.commit(clip_times(10))
        writer.write(0, {5: features[5]})
        with pytest.raises(ValueError, match="times have shape"):
            writer.commit(clip_times(9))
        with pytest.raises(InputError, match="strictly increasing"):
            writer.commit(clip_times(10)[::-1])
        assert writer.commit(clip_times(10))
    assert not fs.write_video("v", video_features(1, 10), clip_times(10), video_info(10))
    with pytest.raises(ValueError, match="may not set"):
        fs.video_writer("w", 10, {"num_clips": 3})
    with pytest.raises(InputError, match="fps"):
        fs.video_writer("w", 10, {"fps": float("nan")})
    with pytest.raises(ValueError, match="positive integer"):
        fs.video_writer("w", 0, {})
    with pytest.raises(ValueError, match="opened for reading"):
        FeatureStore.open(tmp_path / "s.zarr").video_writer("w", 1, {})
    assert_video_equals(fs, "v", features)


def test_non_finite_features_are_refused_and_nothing_is_published(location):
    fs = FeatureStore.create(location, make_meta())
    features = video_features(0, 10)
    features[LAST][4, 1] = np.nan
    with pytest.raises(InputError, match="'v' layer last: the features contain NaN or inf"):
        fs.write_video("v", features, clip_times(10), video_info(10))
    assert fs.videos() == [] and "v" not in fs
    assert fs.write_video("v", video_features(0, 10), clip_times(10), video_info(10))


def test_an_abandoned_writer_leaves_nothing(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    with pytest.raises(RuntimeError):
        with fs.video_writer("v", 10, video_info(10)) as writer:
            writer.write(0, {LAST: np.zeros((10, D))})
            raise RuntimeError("extraction failed")
    assert fs.videos() == [] and os.listdir(tmp_path / "s.zarr" / "attempts" / "v") == []
    assert not (tmp_path / "s.zarr" / "commits").exists()


# -- opening and appending --------------------------------------------------------------------

def test_appending_with_a_different_setup_names_every_differing_key(location):
    FeatureStore.create(location, make_meta())
    other = make_meta(layers=[2, 6], dtype="float32")
    other["backbone"]["checkpoint"]["sha256"] = "cd" * 32
    with pytest.raises(InputError) as caught:
        FeatureStore.create(location, other)
    message = str(caught.value)
    assert message.startswith(location)
    for key in ("backbone.checkpoint.sha256", "layers", "dtype"):
        assert key in message
    assert "protocol" not in message and "\n" not in message
    # The same setup (another day, another process) appends.
    assert FeatureStore.create(location, make_meta()).meta["feature_dim"] == D


def test_format_of_an_existing_store_is_kept(tmp_path):
    FeatureStore.create(tmp_path / "s.h5", make_meta())
    assert FeatureStore.create(tmp_path / "s.h5", make_meta(), format=None).format == "hdf5"
    with pytest.raises(InputError, match="existing hdf5 store"):
        FeatureStore.create(tmp_path / "s.h5", make_meta(), format="zarr")


def test_opening_what_is_not_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "empty").mkdir()
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    h5py.File(tmp_path / "plain.h5", "w").close()
    cases = {"missing": "no such feature store", "empty": "no such feature store",
             "notes.txt": "neither a Zarr", "full": "not a Zarr feature store",
             "plain.zarr": "not a LoSA-TAL feature store", "plain.h5": "not a LoSA-TAL"}
    for name, problem in cases.items():
        with pytest.raises(InputError, match=problem) as caught:
            FeatureStore.open(tmp_path / name)
        assert str(caught.value).startswith(str(tmp_path / name))
    with pytest.raises(InputError, match="not a Zarr feature store"):
        FeatureStore.create(tmp_path / "full", make_meta())
    assert os.listdir(tmp_path / "full") == ["x"]


# -- stores whose metadata lies ---------------------------------------------------------------

def _edit_root_meta(path, **changes):
    document = json.loads((path / "zarr.json").read_text())
    document["attributes"]["losa_tal"].update(changes)
    (path / "zarr.json").write_text(json.dumps(document))


@pytest.mark.parametrize("changes, problem", [
    ({"format_version": 3}, "format_version 3 is not supported"),
    ({"feature_dim": "8"}, "feature_dim must be a positive integer"),
    ({"layers": [2, 2]}, "layers must be a list of distinct"),
    ({"tokens": [1, 2]}, "tokens must be"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"backbone": None}, "backbone must be an object"),
])
def test_malformed_root_metadata_is_refused_on_open(tmp_path, changes, problem):
    FeatureStore.create(tmp_path / "s.zarr", make_meta())
    _edit_root_meta(tmp_path / "s.zarr", **changes)
    with pytest.raises(InputError, match=problem):
        FeatureStore.open(tmp_path / "s.zarr")


@pytest.mark.parametrize("changes, problem", [
    ({"feature_dim": 16}, "layer last has shape \\(6, 8\\), the metadata says \\(6, 16\\)"),
    ({"tokens": [1, 1, 2]}, "layer 2 has shape \\(6, 4, 8\\), the metadata says \\(6, 2, 8\\)"),
    ({"dtype": "float32"}, "layer last is float16, the metadata says float32"),
    ({"layers": [2, 5, 7]}, "layer 7 is missing"),
])
def test_metadata_that_lies_about_the_arrays_is_caught(tmp_path, changes, problem):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    write_video(fs, "v", 0, 6)
    _edit_root_meta(tmp_path / "s.zarr", **changes)
    reader = FeatureStore.open(tmp_path / "s.zarr")
    with pytest.raises(InputError, match=problem):
        reader.read("v")
    report = verify_store(reader)
    assert list(report.bad) == ["v"] and report.checked == 1


def test_video_records_and_times_that_lie_are_caught(tmp_path):
    fs = FeatureStore.create(tmp_path / "s.zarr", make_meta())
    for vid in ("clips", "fps", "times", "good"):
        write_video(fs, vid, 0, 6)
    edit_record(tmp_path / "s.zarr", "clips", num_clips=7)
    edit_record(tmp_path / "s.zarr", "fps", fps=-30)
    import zarr

    zarr.open_array(str(committed_dir(tmp_path / "s.zarr", "times") / "times"), mode="r+")[3] = 0.0
    reader = FeatureStore.open(tmp_path / "s.zarr")
    bad = verify_store(reader).bad
    assert set(bad) == {"clips", "fps", "times"}
    assert "feature times have shape (6,), expected (7,)" in bad["clips"]
    assert "fps -30" in bad["fps"] and "strictly increasing" in bad["times"]
    with pytest.raises(InputError, match="fps -30"):
        reader.video_info("fps")


@pytest.mark.parametrize("store_format", ["zarr", "hdf5"])
def test_damaged_bytes_are_detected_by_checksums(tmp_path, store_format):
    fs = FeatureStore.create(tmp_path / "s", make_meta(), format=store_format)
    write_video(fs, "v", 0, 6)
    write_video(fs, "w", 1, 6)
    if store_format == "zarr":
        path, offset = committed_dir(tmp_path / "s", "v") / "layer_5" / "c" / "0" / "0" / "0", 17
    else:
        with h5py.File(tmp_path / "s", "r") as handle:
            path, offset = tmp_path / "s", handle["videos/v/layer_5"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x40]))
    reader = FeatureStore.open(tmp_path / "s")
    with pytest.raises(InputError, match="video 'v': cannot read layer_5"):
        reader.read("v", [5])
    assert list(verify_store(reader).bad) == ["v"]


# -- video ids --------------------------------------------------------------------------------


def test_hostile_video_ids_stay_inside_the_store(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    fs = FeatureStore.create(base / "s.zarr", make_meta(layers=[], tokens=None))
    h5 = FeatureStore.create(base / "s.h5", make_meta(layers=[], tokens=None))
    for seed, vid in enumerate(HOSTILE_IDS):
        for store in (fs, h5):
            features = {LAST: video_features(seed, 3, [])[LAST]}
            assert store.write_video(vid, features, clip_times(3), video_info(3))
            with store.claim(vid) as mine:
                assert mine
    outside = {path for path in files_under(tmp_path) if not path.startswith(
        (str(base / "s.zarr") + os.sep, str(base / "s.h5")))}
    assert outside == set()
    for store in (FeatureStore.open(base / "s.zarr"), FeatureStore.open(base / "s.h5")):
        assert store.videos() == sorted(HOSTILE_IDS)
        for seed, vid in enumerate(HOSTILE_IDS):
            np.testing.assert_array_equal(store.read(vid)[LAST],
                                          as_stored(video_features(seed, 3, [])[LAST]))
    assert encode_video_id("video_test_0000004") == "video_test_0000004"


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=120))
def test_encoded_ids_are_single_inert_names_that_decode_back(video_id):
    name = encode_video_id(video_id)
    assert "/" not in name and "\\" not in name and "\0" not in name
    assert not name.startswith((".", "_")) and len(name) <= MAX_NAME
    assert name.isascii() and name.isprintable()
    if len(name) < MAX_NAME:
        assert decode_video_id(name) == video_id


def test_long_ids_get_distinct_names():
    assert encode_video_id("x" * 300) != encode_video_id("x" * 301)
    with pytest.raises(ValueError):
        encode_video_id("")


# -- claims -----------------------------------------------------------------------------------

def test_claims_are_exclusive_until_released(location):
    fs = FeatureStore.create(location, make_meta())
    other = FeatureStore.create(location, make_meta())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # local and file:// stores have real locks
        with fs.claim("v") as mine:
            assert mine
            with other.claim("v") as theirs:
                assert not theirs
            with other.claim("w") as theirs:
                assert theirs
        with other.claim("v") as theirs:
            assert theirs


def test_verify_names_damage_that_readers_would_only_skip(tmp_path):
    """A commit record that no longer parses, a record naming another video and a duration that
    contradicts the feature times are damage: verify names each video and exits 1."""
    from click.testing import CliRunner

    import cli
    from helpers.stores import commit_path
    from store.verify import video_length

    location = tmp_path / "s.zarr"
    fs = FeatureStore.create(location, make_meta())
    for vid in ("flipped", "renamed", "stretched", "good"):
        write_video(fs, vid, 0, 6)
    record = fs.video_info("stretched")
    commit_path(location, "flipped").write_bytes(b'{"video_id": "flipped", "pa')
    edit_record(location, "renamed", video_id="good")
    edit_record(location, "stretched", duration=2 * record["duration"])
    reader = FeatureStore.open(location)
    report = verify_store(reader)
    assert set(report.bad) == {"flipped", "renamed", "stretched"} and report.checked == 4
    assert "commit record is damaged" in report.bad["flipped"]
    assert "names another video" in report.bad["renamed"]
    assert "contradicts the feature times" in report.bad["stretched"]
    # Detections are cut where the features end, not at the doubled duration.
    times = reader.feature_times("stretched")
    length = video_length(reader.meta["protocol"], reader.video_info("stretched"), times)
    assert abs(length - record["duration"]) < 0.5 < record["duration"]
    result = CliRunner().invoke(cli.main, ["store", "verify", str(location)])
    assert result.exit_code == 1 and "4 video(s) checked, 3 bad" in result.output
