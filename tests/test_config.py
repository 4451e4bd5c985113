"""Training configs: the shipped files load, and bad keys, types and overrides are one-line errors."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from head.config import HeadConfig
from helpers import REPO
from losa_tal import InputError, parse_override
from training.config import Config, load_config

SHIPPED = sorted((REPO / "configs" / "train").glob("*.json"))


def write(tmp_path, data, name="config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_shipped_configs_load_and_cover_the_three_recipes():
    names = {path.name for path in SHIPPED}
    assert {"thumos_vitg_losa.json", "anet_vitg_losa.json"} <= names
    for path in SHIPPED:
        config = load_config(path)
        # Every shipped file spells out its sections, so a reader sees the recipe in one place.
        assert set(json.loads(path.read_text())) == set(config.to_dict())
    # The head-only baseline is the LoSA recipe with --model head_only (model.type).
    thumos = REPO / "configs/train/thumos_vitg_losa.json"
    assert load_config(thumos, ["model.type=head_only"]).model.type == "head_only"
    assert load_config(REPO / "configs/train/anet_vitg_losa.json").data.mode == "resize"


# The demo recipe as it was written before the keys took the public API's names.
OLD_DEMO = {
    "data": {"dataset": "synth", "train_subset": "train", "mode": "window", "max_seq_len": 128,
             "standardise": True},
    "model": {"type": "losa", "losa": {"bottleneck": 64, "num_heads": 4, "dropout": 0.1}},
    "head": {"embed_dim": 128, "num_levels": 4, "window": 9, "max_seq_len": 128,
             "regression_bounds": [0, 4, 8, 16]},
    "optim": {"lr_head": 1e-3, "lr_adapter": 1e-3, "warmup_epochs": 2, "ema_decay": 0.99},
    "train": {"epochs": 40},
    "eval": {"subset": "test", "every": 0, "max_segments": 200, "pre_nms_topk": 1000,
             "nms": "hard", "nms_sigma": 0.7, "iou_threshold": 0.3, "score_threshold": 0.01},
}


def test_configs_in_the_old_keys_load_as_the_renamed_ones(tmp_path):
    old = load_config(write(tmp_path, OLD_DEMO))
    assert old.head.regression_ranges == [[0, 4], [4, 8], [8, 16], [16, None]]
    post = old.postprocess
    assert (post.pre_nms_top_k, post.nms_method, post.sigma, post.iou_threshold) == \
        (1000, "hard", 0.7, 0.3)
    # The old score threshold also set the NMS floor.
    assert post.score_threshold == post.min_score == 0.01
    assert old.eval.subset == "test" and old.eval.every == 0
    new = load_config(REPO / "configs/demo/train.json", [
        "postprocess.pre_nms_top_k=1000", "postprocess.nms_method=hard", "postprocess.sigma=0.7",
        "postprocess.iou_threshold=0.3", "postprocess.score_threshold=0.01",
        "postprocess.min_score=0.01"])
    assert dataclasses.replace(old, description=new.description) == new
    assert load_config(write(tmp_path, {"head": {"regression_bounds": None}})) == \
        load_config(write(tmp_path, {}))
    with pytest.raises(InputError, match="eval.nms: renamed postprocess.nms_method; give only"):
        load_config(write(tmp_path, {"eval": {"nms": "hard"},
                                     "postprocess": {"nms_method": "soft"}}))


def test_a_typo_is_refused_without_importing_torch(tmp_path):
    """By the library and by ``cli.py train`` (which used to import the trainer first)."""
    path = write(tmp_path, {"head": {"windw": 19}})
    child = subprocess.run([sys.executable, "-c", (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "import cli\n"
        "from losa_tal import InputError\n"
        "from training.config import load_config\n"
        "try:\n"
        f"    load_config({str(path)!r})\n"
        "except InputError as err:\n"
        "    print(err)\n"
        f"result = CliRunner().invoke(cli.main, ['train', '--config', {str(path)!r}])\n"
        "print(result.exit_code, result.output.strip())\n"
        "print('torch' in sys.modules)\n")], capture_output=True, text=True, timeout=60,
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    message = (f"{path}: head.windw: unknown key (known in head: "
               + ", ".join(sorted(HeadConfig.__dataclass_fields__)) + ")")
    assert child.stdout.splitlines() == [message, f"2 error: {message}", "False"], child.stderr


def test_defaults_are_actionformer_thumos_settings(tmp_path):
    config = load_config(write(tmp_path, {}))
    assert config.data.max_seq_len == 2304
    assert config.head.window == 19 and config.head.num_levels == 6
    assert config.optim.lr_head == 1e-4 and config.optim.weight_decay == 0.05
    assert config.postprocess.nms_method == "soft" and config.postprocess.sigma == 0.5


@pytest.mark.parametrize("data, key", [
    ({"modle": {}}, "modle: unknown key"),
    ({"model": {"losa": {"bottlenek": 64}}}, "model.losa.bottlenek: unknown key"),
    ({"optim": {"lr": 1e-3}}, "optim.lr: unknown key"),
    ({"train": {"epochs": "30"}}, "train.epochs: expected an integer"),
    ({"train": {"epochs": 2.5}}, "train.epochs: expected an integer"),
    ({"train": {"amp": 1}}, "train.amp: expected true or false"),
    ({"optim": {"lr_head": True}}, "optim.lr_head: expected a number"),
    ({"model": {"layers": [3, "7"]}}, "model.layers: expected a list of integers or null"),
    ({"model": {"losa": 5}}, "model.losa: expected an object"),
    ({"data": {"mode": "crop"}}, "data.mode: must be one of window, resize"),
    ({"model": {"type": "full"}}, "model.type: must be one of losa, head_only"),
    ({"train": {"micro_batch": 0}}, "train.micro_batch: must be a positive integer"),
    ({"train": {"timeout_minutes": 0}}, "train.timeout_minutes: must be positive"),
    ({"head": {"num_levels": 3, "regression_ranges": [[0, 4], [4, None]]}},
     "head.regression_ranges"),
    ({"eval": {"tiou_thresholds": []}}, "eval.tiou_thresholds: must be"),
    ({"model": {"losa": {"short_window": 8}}}, "model.losa.short_window: must be a positive odd"),
    ({"model": {"losa": {"bottleneck": 30, "num_heads": 4}}},
     "model.losa.bottleneck: must be divisible"),
    ({"head": {"window": 4}}, "head.window: must be odd"),
])
def test_bad_keys_and_types_name_the_file_and_the_key(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(InputError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}")
    assert "\n" not in message


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "a config must be a JSON object"),
])
def test_unreadable_files(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=problem):
        load_config(path)
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "missing.json")


def test_overrides_are_json_literals_with_bare_strings(tmp_path):
    path = write(tmp_path, {"optim": {"lr_head": 1e-4}})
    config = load_config(path, ["optim.lr_head=2e-4", "model.layers=[3, 7]",
                                "model.type=head_only", "eval.max_videos=null",
                                "model.losa.long_window=33"])
    assert config.optim.lr_head == 2e-4
    assert config.model.layers == [3, 7]
    assert config.model.type == "head_only"
    assert config.eval.max_videos is None
    assert config.model.losa.long_window == 33
    assert parse_override("train.amp=false") == (["train", "amp"], False)


def test_set_reaches_every_key(tmp_path):
    """``--set section.key=value`` for every key of every section (sub-sections included)."""
    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    path = write(tmp_path, {})
    defaults = dict(leaves(Config().to_dict()))
    assert {"postprocess.nms_method", "head.regression_ranges", "model.losa.zero_init"} <= \
        set(defaults)
    for key, value in defaults.items():
        # The default written back by --set gives the defaults; a wrong type names the key.
        assert load_config(path, [f"{key}={json.dumps(value)}"]) == Config(), key
        with pytest.raises(InputError, match=f": {re.escape(key)}: expected"):
            load_config(path, [f"{key}={json.dumps({'a': 1})}"])


@pytest.mark.parametrize("override, problem", [
    ("optim.lr_headd=1", "optim.lr_headd: unknown key"),
    ("train.epochs=ten", "train.epochs: expected an integer"),
    ("train.epochs", "expected key.sub=value"),
    ("optim.lr_head.x=1", "optim.lr_head is not a section"),
])
def test_bad_overrides(tmp_path, override, problem):
    path = write(tmp_path, {"optim": {"lr_head": 1e-4}})
    with pytest.raises(InputError, match=problem):
        load_config(path, [override])


def test_round_trip_through_plain_data():
    config = Config.from_dict({"model": {"layers": [1, 2]}, "train": {"epochs": 3}})
    again = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


DOCUMENTED = {  # doc -> the dataclasses whose keys it tables (under a heading naming the class)
    "docs/training.md": ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "EvalConfig"],
    "docs/head.md": ["HeadConfig", "PostprocessConfig"],
    "docs/losa.md": ["LosaConfig"],
}


def documented_defaults(doc: str, name: str) -> dict:
    """``| `key` | default | meaning |`` rows of the doc's sections whose heading names ``name``."""
    rows, inside = {}, False
    for line in (REPO / doc).read_text().splitlines():
        if line.startswith("#"):
            inside = f"`{name}`" in line or f".{name}`" in line
        elif inside and line.startswith("| `"):
            key, default = (cell.strip() for cell in line.split("|")[1:3])
            rows[key.strip("`")] = default.strip("`")
    return rows


@pytest.mark.parametrize("doc, name", [(doc, name) for doc, names in DOCUMENTED.items()
                                       for name in names])
def test_docs_table_every_key_with_the_dataclass_default(doc, name):
    import adapt.config
    import head.config
    import training.config

    cls = next(getattr(m, name) for m in (training.config, head.config, adapt.config)
               if hasattr(m, name))
    rows = documented_defaults(doc, name)
    defaults = dataclasses.asdict(cls())
    assert set(defaults) <= set(rows), f"{doc} lacks {sorted(set(defaults) - set(rows))}"
    for key, value in defaults.items():
        if not isinstance(value, dict):  # a sub-section (model.losa) has its own table
            assert json.loads(rows[key]) == value, (doc, key, rows[key])


def test_a_run_resumes_under_another_description_but_not_other_settings():
    from training.train import config_differences

    config = Config()
    assert config_differences(config, dataclasses.replace(config, description="other")) == []
    changed = Config.from_dict({"description": "x", "postprocess": {"sigma": 0.7}})
    assert config_differences(config, changed) == ["postprocess.sigma"]
