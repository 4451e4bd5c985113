"""Config and input files that are well-formed but hostile: nested too deeply, YAML alias
bombs, backbone arguments of the wrong type, a layer listed twice. Through the real command
line each is one ``error:`` line naming the file or option (exit 2), quickly: never a
RecursionError traceback, minutes of expansion, or a model built from a string or with two
adapters on one block."""
import json
import time

import pytest
from click.testing import CliRunner

import cli
from helpers import REPO
from helpers.videos import write_video

DEEP = "[" * 100_000 + "]" * 100_000


def alias_bomb(levels: int = 10) -> str:
    """A YAML "billion laughs" as a backbone argument: 9^levels strings from a dozen short
    lines, expanded once anything walks the value (recording it in the store's metadata)."""
    lines = ["qkv_bias:", '  - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"  - &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def run_cli(*args):
    started = time.monotonic()
    result = CliRunner().invoke(cli.main, [str(arg) for arg in args])
    return result, time.monotonic() - started


def assert_one_line(result, starts, words):
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, (result.output[-2000:], result.exception)
    assert errors[0].startswith(f"error: {starts}") and words in errors[0], errors[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nesting")
    (folder / "deep.json").write_text(DEEP)
    (folder / "deep_gt.json").write_text('{"database": ' + DEEP + "}")
    (folder / "deep.yaml").write_text(DEEP)
    (folder / "bomb.yaml").write_text(alias_bomb())
    (folder / "preds.json").write_text('{"results": {}}')
    (folder / "gt.json").write_text(json.dumps({"database": {"v": {
        "subset": "test", "duration": 10.0,
        "annotations": [{"segment": [1.0, 2.0], "label": "a"}]}}}))
    (folder / "videos").mkdir()
    write_video(folder / "videos" / "v.mp4", 20)
    return folder


def extract_args(folder, backbone):
    return ["extract", "--videos", folder / "videos", "--out", folder / "s.zarr", "--backbone",
            backbone, "--random-init", "--img-size", "32", "--num-workers", "0",
            "--device", "cpu", "--quiet"]


def cases(folder):
    """(command line, what the error starts with, words in it)."""
    return [
        (["evaluate", "--annotations", folder / "deep.json", "--preds", folder / "preds.json"],
         folder / "deep.json", "nested too deeply"),
        (["evaluate", "--annotations", folder / "deep_gt.json", "--preds", folder / "preds.json"],
         folder / "deep_gt.json", "nested too deeply"),
        (["evaluate", "--annotations", folder / "gt.json", "--preds", folder / "deep.json"],
         folder / "deep.json", "nested too deeply"),
        (["train", "--config", folder / "deep.json"], folder / "deep.json", "nested too deeply"),
        (["train", "--config", REPO / "configs" / "train" / "thumos_vitg_losa.json", "--set",
          "model.layers=" + "[" * 100_000], "--set model.layers", "nested too deeply"),
        (extract_args(folder, folder / "deep.json"), folder / "deep.json", "nested too deeply"),
        (extract_args(folder, folder / "deep.yaml"), folder / "deep.yaml", "nested too deeply"),
        (extract_args(folder, folder / "bomb.yaml"), folder / "bomb.yaml", "alias"),
    ]


def test_deep_nesting_and_alias_bombs_are_one_line_each(inputs):
    for args, starts, words in cases(inputs):
        result, seconds = run_cli(*args)
        assert_one_line(result, starts, words)
        assert seconds < 30, (args[:2], seconds)


test_deep_nesting_and_alias_bombs_are_one_line_each.reliability_cases = 8


@pytest.mark.parametrize("name, value, words", [
    ("qkv_bias", "false", "qkv_bias must be true or false"),
    ("use_mean_pooling", 1, "use_mean_pooling must be true or false"),
    ("depth", 2.5, "depth must be a positive integer"),
    ("embed_dim", True, "embed_dim must be a positive integer"),
    ("mlp_ratio", "4", "mlp_ratio must be a positive number"),
    ("drop_path_rate", 1.5, "drop_path_rate must be a number in [0, 1)"),
    ("init_values", float("nan"), "init_values must be a finite number"),
    ("qk_scale", "auto", "qk_scale must be null or a positive number"),
    ("img_size", [32, "32"], "img_size[1] must be a positive integer"),
])
def test_backbone_arguments_of_the_wrong_type_are_refused(name, value, words):
    import re

    import torch

    from extract.backbone import build_backbone
    from losa_tal import InputError

    spec = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16, name: value}
    with pytest.raises(InputError, match="^tiny.json: " + re.escape(words)), \
            torch.device("meta"):
        build_backbone(spec, source="tiny.json")


def test_a_layer_listed_twice_is_refused():
    """``--set model.layers=[1,1]`` trained two adapters on one block (extract refuses the
    same duplicate in --layers)."""
    config = REPO / "configs" / "train" / "thumos_vitg_losa.json"
    result, _ = run_cli("train", "--config", config, "--set", "model.layers=[1,1]")
    assert_one_line(result, config, "model.layers")
    assert "distinct" in result.output


def test_convert_reads_a_deeply_nested_annotation_file_as_one_line(inputs):
    """`convert actionformer` read the class names with a bare json.loads: a RecursionError."""
    from losa_tal import InputError
    from training.convert import class_names

    with pytest.raises(InputError, match="nested too deeply") as caught:
        class_names(inputs / "deep_gt.json", 2)
    assert str(inputs / "deep_gt.json") in str(caught.value)
