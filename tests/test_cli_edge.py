"""The command-line edge: library code names settings by key, and ``losa_tal.flag_errors`` (one
helper, used by every command) turns them into the flag, preset file or ``--set`` the user typed."""
import pytest

from helpers.extraction import run_cli
from helpers.stores import make_meta
from losa_tal import ConfigError, InputError, flag_errors

FLAGS = {"fps": "--fps", "protocol.clip_stride": "--clip-stride", "out_dir": "--out"}


@pytest.mark.parametrize("key, origins, expected", [
    ("fps", None, "--fps: must be positive"),  # a flag of its own: the key is the flag
    ("protocol.clip_stride", None, "--clip-stride: protocol clip_stride: must be positive"),
    ("protocol.clip_stride", {"protocol.clip_stride": "--set"},
     "--set: protocol.clip_stride: must be positive"),
    ("protocol.clip_stride", {"protocol": "thumos.json"},  # a section covers its keys
     "thumos.json: protocol.clip_stride: must be positive"),
])
def test_a_config_error_names_where_its_value_came_from(key, origins, expected):
    with pytest.raises(InputError) as err, flag_errors(FLAGS, origins):
        raise ConfigError(key, "must be positive")
    assert str(err.value) == expected


def test_an_unmapped_key_stays_a_config_error_and_backticked_keys_become_flags():
    with pytest.raises(ConfigError, match="^seed: "), flag_errors(FLAGS):
        raise ConfigError("seed", "must be zero or more")
    with pytest.raises(InputError) as err, flag_errors(FLAGS):
        raise InputError("run/: already holds a run; choose another `out_dir`")
    assert str(err.value) == "run/: already holds a run; choose another --out"


def test_hdf5_over_a_url_names_the_format_flag_only_at_the_edge():
    from store import FeatureStore

    url = "http://127.0.0.1:9/features.h5"
    with pytest.raises(InputError) as library:
        FeatureStore.create(url, make_meta(), format="hdf5")
    assert "use `format` zarr for URLs" in str(library.value)
    with pytest.raises(InputError) as command, flag_errors({"format": "--format"}):
        FeatureStore.create(url, make_meta(), format="hdf5")
    assert str(command.value) == f"{url}: HDF5 stores must be local files; use --format zarr " \
        "for URLs"


def test_commands_name_their_out_flag(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    demo = run_cli("demo", "--out", not_a_folder)
    assert demo.exit_code == 2
    assert demo.output.strip().endswith("exists and is not a folder; choose another --out")

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")
    for name in ("af.pth", "af.yaml"):
        (tmp_path / name).write_text("")
    convert = run_cli("convert", "actionformer", "--checkpoint", tmp_path / "af.pth",
                      "--config", tmp_path / "af.yaml", "--store", tmp_path / "store.zarr",
                      "--out", run)
    assert convert.exit_code == 2
    assert convert.output.strip() == f"error: {run}: already holds a run; choose another --out"


def test_a_store_url_refusal_names_the_storage_options_flag():
    from store.errors import NOT_AUTHORISED
    from store.urls import FLAG

    assert "`storage_options`" in NOT_AUTHORISED  # the library names the key ...
    with pytest.raises(InputError) as err, flag_errors({"storage_options": FLAG}):
        raise InputError(f"s3://bucket/store: {NOT_AUTHORISED}")
    assert "check the credentials: --storage-options or the environment" in str(err.value)
