"""Reliability campaign, hostile backbone checkpoints (see docs/reliability.md).

State dicts derived from a real (tiny) VideoMAEv2 by hypothesis: keys dropped, added or renamed,
tensors reshaped, NaN/inf, cast to other dtypes, replaced by plain values, wrapped the ways
releases wrap them, files cut short, pickled objects. ``extract.backbone.load_checkpoint`` must
either load exactly the finite weights it was given, or raise one ``InputError`` line naming the
file and leave the model untouched: never another exception, never code execution.
"""
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from extract.backbone import VideoMAEv2, load_checkpoint
from helpers.hostile import CodeExecution, fuzz
from losa_tal import InputError

TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=32, depth=2,
            num_heads=4, mlp_ratio=2.0, qkv_bias=True, init_values=0.0, all_frames=4,
            tubelet_size=2, use_mean_pooling=True)
MODEL = VideoMAEv2(**TINY).eval()
GOOD = {name: torch.randn(value.shape, generator=torch.Generator().manual_seed(index)) * 0.05
        for index, (name, value) in enumerate(MODEL.state_dict().items())}
KEYS = sorted(GOOD)


key = st.sampled_from(KEYS)
odd_value = st.sampled_from([None, 3, "weights", [1.0, 2.0], {"a": 1}, 1.5])
# Each key edit takes the flat state dict and returns the edited one.
key_edits = st.one_of(
    key.map(lambda k: lambda s: {n: v for n, v in s.items() if n != k}),  # missing
    # ("encoder." + a key that is also there plain: see test_a_weight_given_twice_is_refused)
    st.tuples(key, st.sampled_from(["x.", "decoder.", "blocks.9.", "module."])).map(
        lambda kp: lambda s: {**s, kp[1] + kp[0]: GOOD[kp[0]]}),  # extra
    st.tuples(key, st.lists(st.integers(0, 5), max_size=3)).map(  # another shape
        lambda ks: lambda s: {**s, ks[0]: torch.zeros(ks[1])}),
    st.tuples(key, st.sampled_from([float("nan"), float("inf"), -float("inf")])).map(
        lambda kv: lambda s: {**s, kv[0]: torch.full_like(GOOD[kv[0]], kv[1])}),
    st.tuples(key, st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                    torch.bool, torch.complex64, torch.uint8])).map(
        lambda kd: lambda s: {**s, kd[0]: GOOD[kd[0]].to(kd[1])}),
    st.tuples(key, odd_value).map(lambda kv: lambda s: {**s, kv[0]: kv[1]}),  # not a tensor
    st.just(lambda s: {**s, "pos_embed": torch.randn(1, 32, TINY["embed_dim"])}),
)
# Then the container the flat dict is saved in: as it is, or as releases wrap it, or broken.
containers = st.sampled_from([
    lambda s: s,
    lambda s: {"model": s, "epoch": 3},
    lambda s: {"module": s},
    lambda s: {"state_dict": s},
    lambda s: {f"encoder.{n}": v for n, v in s.items()},
    lambda s: list(s.values()),
    lambda s: {},
    lambda s: None,
])


def unwrapped(saved) -> dict:
    """The flat state dict inside what was saved (as the loader documents its wrappers)."""
    if not isinstance(saved, dict):
        return {}
    inner = saved.get("model", saved.get("module", saved))
    return {n.removeprefix("encoder."): v for n, v in inner.items()}


def load_outcome(path):
    """Load into a fresh copy of MODEL: (error message or None, the model's state after)."""
    model = VideoMAEv2(**TINY).eval()
    model.load_state_dict(GOOD)
    try:
        load_checkpoint(model, path)
    except InputError as err:
        return str(err), model.state_dict()
    return None, model.state_dict()


def assert_refused_cleanly(message, after, path):
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert all(torch.equal(after[name], GOOD[name]) for name in GOOD), "model changed"


@fuzz(300)
@given(chosen=st.lists(key_edits, max_size=3), container=containers)
def test_edited_state_dicts_load_exactly_or_are_refused_by_name(tmp_path, chosen, container):
    state = dict(GOOD)
    for edit in chosen:
        state = edit(state)
    saved = container(state)
    path = tmp_path / "backbone.pth"
    torch.save(saved, path)
    message, after = load_outcome(path)
    if message is not None:
        assert_refused_cleanly(message, after, path)
        return
    # Loaded: every weight of the model is a finite weight the file really held.
    stored = unwrapped(saved)
    for name, value in after.items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, stored[name].to(value.dtype)), name


@fuzz(60)
@given(cut=st.floats(0, 0.999), flip=st.booleans())
def test_files_cut_short_are_refused_by_name(tmp_path, cut, flip):
    path = tmp_path / "backbone.pth"
    torch.save(GOOD, path)
    data = path.read_bytes()
    data = data[: int(len(data) * cut)]
    if flip and data:  # a damaged header as well
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    path.write_bytes(data)
    message, after = load_outcome(path)
    assert message is not None, "a truncated checkpoint loaded"
    assert_refused_cleanly(message, after, path)


PICKLED = {
    "torch.save of an object": lambda p, marker: torch.save(
        {**GOOD, "x": CodeExecution(marker)}, p),
    "plain pickle": lambda p, marker: p.write_bytes(
        pickle.dumps({"model": CodeExecution(marker)})),
    "pickle protocol 0": lambda p, marker: p.write_bytes(pickle.dumps(CodeExecution(marker), 0)),
}


def test_pickled_payloads_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    for name, write in PICKLED.items():
        path = tmp_path / f"{name}.pth"
        write(path, marker)
        message, after = load_outcome(path)
        assert message is not None, name
        assert_refused_cleanly(message, after, path)
    assert not marker.exists()


test_pickled_payloads_never_run.reliability_cases = len(PICKLED)


def test_a_weight_given_twice_is_refused(tmp_path):
    """A file holding ``x`` and ``encoder.x`` with different values is ambiguous."""
    name = KEYS[0]
    path = tmp_path / "twice.pth"
    torch.save({**GOOD, name: GOOD[name] + 1, f"encoder.{name}": GOOD[name]}, path)
    message, after = load_outcome(path)
    assert message is not None, "one of two different values was chosen silently"
    assert_refused_cleanly(message, after, path)
