"""The VideoMAEv2 backbone: equality with a plain re-implementation of the official model,
taps, presets, and checkpoint loading and its refusals. Tiny models, fp32 on CPU."""

import argparse
import hashlib
import json
import os

import pytest
import torch

from extract.backbone import (PRESETS, VideoMAEv2, backbone_config, build_backbone,
                              count_parameters, load_checkpoint, sincos_position_table)
from helpers.backbone import TINY, clips, random_state
from helpers.reference_videomae import RefVideoMAEv2, reference_position_table
from losa_tal import ConfigError, InputError

CASES = {
    "mean-pooling": (TINY, (16, 32, 32)),
    # layer scale, first-token norm, a head, ViT-g's MLP ratio with a non-power-of-2 width
    "layer-scale-head": (dict(TINY, embed_dim=88, mlp_ratio=48 / 11, init_values=0.1,
                              use_mean_pooling=False, num_classes=5, patch_size=16, img_size=48,
                              all_frames=8), (8, 48, 48)),
    "no-qkv-bias": (dict(TINY, qkv_bias=False, tubelet_size=1, all_frames=4), (4, 32, 32)),
    # built for 16 frames of 32 px, run on 8 frames of 112 px: the table is recomputed
    "other-clip-size": (dict(TINY, patch_size=16), (8, 112, 112)),
}


def reference_for(config, clip_shape):
    frames, height, _ = clip_shape
    return RefVideoMAEv2(**dict(config, all_frames=frames, img_size=height)).eval()


@pytest.mark.parametrize("case", CASES)
def test_outputs_equal_the_reference_implementation(case):
    config, clip_shape = CASES[case]
    ours, ref = VideoMAEv2(**config).eval(), reference_for(config, clip_shape)
    state = random_state(ours)
    ours.load_state_dict(state)
    ref.load_state_dict(state)
    x = clips(*clip_shape)
    with torch.no_grad():
        ref_pooled, ref_blocks = ref.block_outputs(x)
        blocks = ours.forward_intermediates(x, range(config["depth"]))
        pooled, taps = ours.forward_taps(x, [0, config["depth"] - 1])
        assert len(blocks) == config["depth"]
        for mine, theirs in zip(blocks, ref_blocks):
            torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.forward_features(x), ref_pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(taps[0], ref_blocks[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(taps[1], ref_blocks[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    assert ours(x).shape == (2, config["num_classes"] or config["embed_dim"])


def test_state_dict_keys_are_the_official_ones():
    model = VideoMAEv2(**dict(TINY, init_values=0.1, num_classes=3))
    keys = set(model.state_dict())
    assert {"patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.attn.qkv.weight",
            "blocks.0.attn.q_bias", "blocks.0.attn.v_bias", "blocks.0.attn.proj.weight",
            "blocks.0.norm1.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
            "blocks.0.mlp.fc2.bias", "blocks.0.gamma_1", "blocks.0.gamma_2", "fc_norm.weight",
            "head.weight", "head.bias"} <= keys
    assert not any("pos_embed" in k or "k_bias" in k or "qkv.bias" in k for k in keys)
    assert model.patch_embed.proj.kernel_size == (2, 8, 8)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    assert "norm.weight" in VideoMAEv2(**dict(TINY, use_mean_pooling=False)).state_dict()


@pytest.mark.parametrize("num_positions, dim", [(1568, 64), (16, 1408), (36, 88)])
def test_position_table_is_bit_exact_including_after_a_cast(num_positions, dim):
    expected = reference_position_table(num_positions, dim)[0]
    assert torch.equal(sincos_position_table(num_positions, dim), expected)
    model = VideoMAEv2(**dict(TINY, embed_dim=dim, num_heads=4))
    table = model._position_table(num_positions, torch.device("cpu"), torch.bfloat16)
    assert torch.equal(table, expected.type(torch.bfloat16))
    assert model._position_table(num_positions, torch.device("cpu"), torch.bfloat16) is table


def test_intermediates_stop_after_the_last_block_asked_for():
    model = VideoMAEv2(**dict(TINY, depth=4)).eval()
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    x = clips(16, 32, 32)
    with torch.no_grad():
        first, second = model.forward_intermediates(x, [1, 0])
        assert calls == [0, 1]
        last, again = model.forward_intermediates(x, [-1, 3])
    assert first.shape == (2, 128, 64) and not torch.equal(first, second)
    assert torch.equal(last, again)
    assert model.forward_intermediates(x, []) == []


def test_token_grid_matches_the_token_count():
    model = VideoMAEv2(**TINY)
    assert model.token_grid == (8, 4, 4)
    assert model.token_grid_for(8, 112, 96) == (4, 14, 12)
    with torch.no_grad():
        (tokens,) = model.forward_intermediates(clips(8, 112, 96, batch=1), [0])
    assert tokens.shape[1] == 4 * 14 * 12


def test_bad_indices_and_clips_are_refused():
    model = VideoMAEv2(**TINY)
    with pytest.raises(ConfigError, match="block 3 does not exist in a 3-block"):
        model.forward_intermediates(clips(16, 32, 32), [0, 3])
    with pytest.raises(ConfigError, match="block -4"):
        model.forward_taps(clips(16, 32, 32), [-4])
    with pytest.raises(TypeError):
        model.forward_intermediates(clips(16, 32, 32), [1.0])
    with pytest.raises(ValueError, match="tubelets"):
        model.forward_features(clips(15, 32, 32))
    with pytest.raises(ValueError, match="expected clips"):
        model.forward_features(torch.zeros(1, 1, 16, 32, 32))


def test_bf16_autocast_tracks_fp32():
    model = VideoMAEv2(**TINY).eval()
    model.load_state_dict(random_state(model))
    x = clips(16, 32, 32)
    with torch.no_grad():
        exact, (exact_tap,) = model.forward_taps(x, [1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pooled, (tap,) = model.forward_taps(x, [1])
    assert tap.dtype == torch.bfloat16
    for low, high in ((pooled, exact), (tap, exact_tap)):
        relative = (low.float() - high).norm() / high.norm()
        assert relative < 0.05


# ---- presets and configs --------------------------------------------------------------------

def expected_parameters(c):
    """Parameters of a VideoMAEv2 preset, counted from the architecture by hand."""
    d, hidden = c["embed_dim"], int(c["embed_dim"] * c["mlp_ratio"])
    patch = c["in_chans"] * c["tubelet_size"] * c["patch_size"] ** 2 * d + d
    block = 4 * d + 3 * d * d + 2 * d + d * d + d + d * hidden + hidden + hidden * d + d
    return patch + c["depth"] * block + 2 * d


@pytest.mark.parametrize("name", PRESETS)
def test_presets_have_the_released_sizes(name):
    with torch.device("meta"):
        model = build_backbone(name)
    assert count_parameters(model) == expected_parameters(PRESETS[name])
    assert model.token_grid == ((8, 16, 16) if name == "vit_g" else (8, 14, 14))


def test_vit_g_is_the_one_billion_parameter_model():
    with torch.device("meta"):
        model = build_backbone("vit_g")
    assert (model.depth, model.embed_dim, model.blocks[0].attn.num_heads) == (40, 1408, 16)
    assert model.blocks[0].mlp.fc1.out_features == 6144
    assert 1.00e9 < count_parameters(model) < 1.02e9


def test_configs_resolve_presets_overrides_and_round_trip_through_json():
    config = backbone_config({"preset": "vit_s", "depth": 2}, num_classes=7)
    assert (config["embed_dim"], config["depth"], config["num_classes"]) == (384, 2, 7)
    assert json.loads(json.dumps(config)) == config
    model = build_backbone(json.loads(json.dumps(config)))
    assert (model.depth, model.num_classes) == (2, 7)
    assert build_backbone("vit_b", depth=1, img_size=32).token_grid == (8, 2, 2)


def test_bad_configs_are_input_errors_naming_the_source():
    with pytest.raises(InputError, match=r"my\.json: unknown backbone argument\(s\) colour, sizes"):
        build_backbone(dict(TINY, colour=1, sizes=2), source="my.json")
    with pytest.raises(InputError, match="unknown backbone preset 'vit_x'"):
        build_backbone("vit_x")
    with pytest.raises(InputError, match="cfg.yaml: embed_dim 66 is not divisible by num_heads 4"):
        build_backbone(dict(TINY, embed_dim=66), source="cfg.yaml")
    with pytest.raises(InputError, match="not supported"):
        build_backbone(dict(TINY, cos_attn=True))
    with pytest.raises(InputError, match="depth must be a positive integer"):
        build_backbone(dict(TINY, depth="3"))


# ---- checkpoints ----------------------------------------------------------------------------

class NotWeights:
    """An arbitrary Python object that a weights-only load must refuse."""


@pytest.fixture
def trained():
    model = VideoMAEv2(**TINY).eval()
    model.load_state_dict(random_state(model, seed=3))
    return model


def fresh(**changes):
    return VideoMAEv2(**dict(TINY, **changes)).eval()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("wrap", ["plain", "model", "module", "training-checkpoint"])
def test_fine_tuned_checkpoints_load_and_return_the_sha256(tmp_path, trained, wrap):
    state = trained.state_dict()
    payload = {
        "plain": state, "model": {"model": state}, "module": {"module": state},
        # what the official training loop saves: options and counters next to the weights
        "training-checkpoint": {"model": state, "epoch": 3, "args": argparse.Namespace(lr=1e-3)},
    }[wrap]
    path = tmp_path / "ft.pth"
    torch.save(payload, path)
    model = fresh()
    assert load_checkpoint(model, path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert same_weights(model, trained)
    x = clips(16, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.forward_features(x), trained.forward_features(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_model_built_on_meta_takes_the_checkpoint_tensors_in_the_compute_dtype(tmp_path,
                                                                               trained, dtype):
    """Extraction's path: no fp32 model on the host first; the same weights, cast once."""
    path = tmp_path / "ft.pth"
    torch.save(trained.state_dict(), path)
    with torch.device("meta"):
        model = VideoMAEv2(**TINY).eval()
    assert load_checkpoint(model, path, torch.device("cpu"), dtype) == \
        hashlib.sha256(path.read_bytes()).hexdigest()
    state = model.state_dict()
    assert all(v.device.type == "cpu" and v.dtype == dtype for v in state.values())
    assert all(torch.equal(state[k], v.to(dtype)) for k, v in trained.state_dict().items())
    if dtype == torch.float32:  # CPU fp32: the very features of the model loaded the old way
        x = clips(16, 32, 32)
        with torch.no_grad():
            assert torch.equal(model.forward_features(x), trained.forward_features(x))


def test_pretrain_checkpoint_loads_its_encoder(tmp_path):
    encoder = fresh(use_mean_pooling=False)
    encoder.load_state_dict(random_state(encoder, seed=4))
    payload = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    payload.update({"decoder.blocks.0.norm1.weight": torch.ones(32),
                    "mask_token": torch.zeros(1, 1, 32),
                    "encoder_to_decoder.weight": torch.ones(32, 64)})
    path = tmp_path / "pt.pth"
    torch.save({"model": payload}, path)
    model = fresh(use_mean_pooling=False)
    load_checkpoint(model, path)
    assert same_weights(model, encoder)
    with pytest.raises(InputError, match="missing fc_norm.bias, fc_norm.weight.*use_mean_pool"):
        load_checkpoint(fresh(), path)


def test_head_is_skipped_only_by_a_headless_model(tmp_path, trained):
    with_head = fresh(num_classes=4)
    with_head.load_state_dict(random_state(with_head, seed=5))
    path = tmp_path / "k710.pth"
    torch.save(with_head.state_dict(), path)
    headless = fresh()
    load_checkpoint(headless, path)
    assert torch.equal(headless.blocks[2].mlp.fc2.weight, with_head.blocks[2].mlp.fc2.weight)
    torch.save(trained.state_dict(), path)
    with pytest.raises(InputError, match="missing head.bias, head.weight"):
        load_checkpoint(fresh(num_classes=4), path)


def edit(state, drop=(), add=None, reshape=None):
    state = {k: v for k, v in state.items() if k not in drop}
    state.update(add or {})
    for key, shape in (reshape or {}).items():
        state[key] = torch.zeros(shape)
    return state


@pytest.mark.parametrize("change, message", [
    (dict(drop=["blocks.1.attn.q_bias"]), r"missing blocks\.1\.attn\.q_bias"),
    (dict(add={"blocks.3.attn.qkv.weight": torch.zeros(192, 64)}),
     r"unexpected blocks\.3\.attn\.qkv\.weight.*backbone preset"),
    (dict(reshape={"blocks.0.mlp.fc1.weight": (128, 64)}),
     r"wrong shape blocks\.0\.mlp\.fc1\.weight \[128, 64\] \(model: \[256, 64\]\)"),
    (dict(add={"blocks.0.attn.proj.weight": torch.full((64, 64), float("nan"))}),
     r"non-finite .*blocks\.0\.attn\.proj\.weight"),
    (dict(add={"fc_norm.weight": torch.full((64,), float("inf"))}),
     r"non-finite .* fc_norm\.weight"),
    (dict(add={"fc_norm.bias": torch.zeros(64, dtype=torch.long)}),
     r"non-floating-point .*fc_norm\.bias"),
    (dict(add={"pos_embed": torch.randn(1, 128, 64)}),
     r"pos_embed \[1, 128, 64\] is not the fixed"),
])
def test_mismatched_checkpoints_are_refused_and_leave_the_model_untouched(tmp_path, trained, change,
                                                                        message):
    path = tmp_path / "bad.pth"
    torch.save(edit(trained.state_dict(), **change), path)
    model = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=message) as refused:
        load_checkpoint(model, path)
    assert str(refused.value).startswith(str(path))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_stored_fixed_position_table_is_dropped(tmp_path, trained, dtype):
    table = sincos_position_table(128, 64)[None].to(dtype)
    path = tmp_path / "with_table.pth"
    torch.save({"module": {**trained.state_dict(), "pos_embed": table}}, path)
    model = fresh()
    load_checkpoint(model, path)
    assert same_weights(model, trained)


def test_pickled_objects_are_refused_by_name(tmp_path, trained):
    path = tmp_path / "pickled.pth"
    torch.save({"model": trained.state_dict(), "extra": NotWeights()}, path)
    with pytest.raises(InputError, match=rf"{path}: refused: .*NotWeights.*weights_only"):
        load_checkpoint(fresh(), path)


@pytest.mark.parametrize("content", ["text", "random", "empty", "truncated", "list", "missing"])
def test_files_that_are_not_checkpoints_are_refused(tmp_path, trained, content):
    path = tmp_path / "weights.pth"
    if content == "text":
        path.write_text("not a checkpoint\n")
    elif content == "random":
        path.write_bytes(os.urandom(4096))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":
        torch.save(trained.state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "list":
        torch.save(list(trained.state_dict().values()), path)
    with pytest.raises(InputError) as refused:
        load_checkpoint(fresh(), path)
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_legacy_serialisation_loads(tmp_path, trained):
    path = tmp_path / "legacy.pth"
    torch.save(trained.state_dict(), path, _use_new_zipfile_serialization=False)
    model = fresh()
    load_checkpoint(model, path)
    assert same_weights(model, trained)
