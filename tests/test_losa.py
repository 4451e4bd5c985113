"""LoSA adapters: exact head-only start, gradients at step 0, masking, windows, parameter counts."""
import pytest
import torch

from adapt import LoSA, count_trainable_parameters, losa_parameter_count
from adapt.losa import LongRangeAdapter, ShortRangeAdapter
from head import ActionFormerHead


DIM, LAYERS, TOKENS, LENGTH, CLASSES = 32, 3, 4, 64, 5


def small_losa(**kwargs):
    options = dict(bottleneck=16, num_heads=2, short_window=5, dropout=0.0)
    options.update(kwargs)
    return LoSA(DIM, LAYERS, TOKENS, **options)


def features(batch=2, length=LENGTH, valid=(LENGTH, 40), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    last = torch.randn(batch, length, DIM, generator=generator).to(dtype)
    inter = torch.randn(batch, LAYERS, length, TOKENS, DIM, generator=generator).to(dtype)
    mask = torch.arange(length)[None] < torch.tensor(valid)[:, None]
    return last, inter, mask


def open_fusion(losa, seed=1):
    """Random gates and fusion projection, as after some training (both start closed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        losa.gates.copy_(torch.randn(losa.gates.shape, generator=generator))
        losa.fuse.weight.copy_(torch.randn(losa.fuse.weight.shape, generator=generator) * 0.1)
    return losa


@pytest.mark.parametrize("zero_init", ["fuse", "gates"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_at_init_head_sees_exactly_the_head_only_input(dtype, zero_init):
    torch.manual_seed(0)
    losa = small_losa(zero_init=zero_init).to(dtype)
    head = ActionFormerHead(DIM, CLASSES, embed_dim=32, num_heads=2).to(dtype).eval()
    last, inter, mask = features(dtype=dtype)
    fused = losa(last, inter, mask)
    assert fused.dtype == dtype
    assert torch.equal(fused, last)
    with_losa, head_only = head(fused, mask), head(last, mask)
    for key in ("cls_logits", "offsets"):
        for a, b in zip(with_losa[key], head_only[key]):
            assert torch.equal(a, b)


def test_fusion_learns_at_step_zero_and_one_step_moves_off_baseline():
    torch.manual_seed(0)
    losa = small_losa()
    head = ActionFormerHead(DIM, CLASSES, embed_dim=32, num_heads=2)
    last, inter, mask = features()
    targets = [{"segments": torch.tensor([[10.0, 30.0]]), "labels": torch.tensor([1])},
               {"segments": torch.tensor([[2.0, 9.0]]), "labels": torch.tensor([3])}]
    loss = head.loss(head(losa(last, inter, mask), mask), targets)["total"]
    loss.backward()
    # The zero projection learns from every adapter's output at once (no saddle to escape)...
    grad = losa.fuse.weight.grad
    assert (grad != 0).any(dim=0).all()                     # every bottleneck channel
    # ...while nothing behind it does yet: gates and adapters follow once it has moved.
    assert losa.gates.grad.abs().max() == 0
    assert losa.short[0].cross.query_down.weight.grad.abs().max() == 0
    torch.optim.AdamW(losa.parameters(), lr=1e-2).step()
    with torch.no_grad():
        fused = losa(last, inter, mask)
    assert not torch.allclose(fused[mask], last[mask])
    assert torch.equal(fused[~mask], last[~mask])        # padding stays untouched


def test_intermediate_layers_reach_the_output():
    losa = open_fusion(small_losa()).eval()
    last, inter, mask = features()
    other_inter = features(seed=5)[1]
    with torch.no_grad():
        changed = losa(last, other_inter, mask) - losa(last, inter, mask)
    # Per clip, not just somewhere: the query residual carries each clip's own layer features.
    assert (changed[mask].abs().amax(dim=-1) > 1e-4).all()


def test_short_range_output_depends_on_which_token_said_what():
    """Swapping a clip's tokens (say its early and late halves) changes the adapter output, even
    where attention cannot tell them apart: a mean over tokens would be blind to the order."""
    adapter = ShortRangeAdapter(DIM, 16, 2, TOKENS, window=5).eval()
    _, inter, mask = features(batch=1, valid=(LENGTH,))
    memory = torch.ones(1, LENGTH, 16)  # identical keys: every query attends alike
    swapped = inter[:, 0].flip(dims=[2])
    with torch.no_grad():
        original, reordered = adapter(inter[:, 0], memory, mask), adapter(swapped, memory, mask)
    assert (original - reordered).abs().amax(dim=-1).min() > 1e-4


def test_padding_content_never_reaches_valid_steps():
    losa = open_fusion(small_losa(long_window=9)).eval()
    last, inter, mask = features()
    noisy_last, noisy_inter = last.clone(), inter.clone()
    noisy_last[~mask] = 1e3
    noisy_inter.permute(0, 2, 1, 3, 4)[~mask] = -1e3
    with torch.no_grad():
        clean, noisy = losa(last, inter, mask), losa(noisy_last, noisy_inter, mask)
    assert torch.allclose(clean[mask], noisy[mask], atol=1e-5)
    assert torch.equal(noisy[~mask], noisy_last[~mask])


def test_fully_padded_video_gives_finite_output():
    losa = open_fusion(small_losa())
    last, inter, mask = features(valid=(LENGTH, 0))
    out = losa(last, inter, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in losa.parameters() if p.grad is not None)


@pytest.mark.parametrize("adapter, reach", [
    (ShortRangeAdapter(DIM, 16, 2, TOKENS, window=5), 2),
    (LongRangeAdapter(DIM, 16, 2, window=9), 4),
    (LongRangeAdapter(DIM, 16, 2, window=None), LENGTH),
])
def test_adapters_see_exactly_their_window(adapter, reach):
    adapter.eval()
    last, inter, mask = features(batch=1, valid=(LENGTH,))
    memory = torch.randn(1, LENGTH, 16)
    query_step = 30
    with torch.no_grad():
        base = adapter(inter[:, 0], memory, mask)[0, query_step]
        for step in range(LENGTH):
            moved = memory.clone()
            moved[0, step] += 1.0
            changed = not torch.allclose(adapter(inter[:, 0], moved, mask)[0, query_step], base)
            assert changed == (abs(step - query_step) <= reach), step


def test_checkpointed_layers_give_the_same_result_and_gradients():
    torch.manual_seed(0)
    plain = open_fusion(small_losa())
    stored = small_losa(checkpoint_layers=True)
    stored.load_state_dict(plain.state_dict())
    last, inter, mask = features()
    outputs = []
    for model in (plain, stored):
        out = model(last, inter, mask)
        out.square().mean().backward()
        outputs.append(out)
    assert torch.allclose(outputs[0], outputs[1])
    for a, b in zip(plain.parameters(), stored.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_parameter_count_matches_a_built_model_and_grows_with_layers():
    built = count_trainable_parameters(small_losa())
    assert losa_parameter_count(DIM, LAYERS, TOKENS, bottleneck=16, num_heads=2,
                                short_window=5) == built
    assert losa_parameter_count(1408, 39, 4) > losa_parameter_count(1408, 13, 4)


def test_wrong_shapes_are_refused_with_the_expected_layout():
    losa = small_losa()
    last, inter, mask = features()
    with pytest.raises(ValueError, match=r"\[B, L, T, K, D\]"):
        losa(last, inter[:, :2], mask)
    with pytest.raises(ValueError, match="bool mask"):
        losa(last, inter, mask.float())
    with pytest.raises(ValueError, match="odd"):
        small_losa(short_window=4)


@pytest.mark.parametrize("kept", ["short", "long"])
def test_one_range_variant_is_losa_with_the_other_range_shut(kept):
    """The ablation's single-range LoSA computes what full LoSA does with the other range's
    gates at zero: same weights, same output; and it starts as head-only too."""
    torch.manual_seed(0)
    full = open_fusion(small_losa()).eval()
    one = small_losa(adapters=kept).eval()
    last, inter, mask = features()
    assert torch.equal(one(last, inter, mask), last)
    row = ("short", "long").index(kept)
    state = {k: v for k, v in full.state_dict().items()
             if not k.startswith(("short.", "long.")) or k.startswith(kept + ".")}
    state["gates"] = full.gates[row:row + 1].detach().clone()
    one.load_state_dict(state)
    with torch.no_grad():
        full.gates[1 - row].zero_()
        assert torch.allclose(one(last, inter, mask), full(last, inter, mask), atol=1e-6)
    assert not hasattr(one, ("short", "long")[1 - row])


def test_unknown_adapters_choice_is_refused_by_name():
    with pytest.raises(ValueError, match="adapters: must be one of"):
        small_losa(adapters="medium")


def test_long_range_relative_bias_starts_as_the_plain_band_and_learns_where_to_look():
    torch.manual_seed(0)
    plain = LongRangeAdapter(DIM, 16, 2, window=9).eval()
    biased = LongRangeAdapter(DIM, 16, 2, window=9, relative_bias=True).eval()
    biased.load_state_dict({**plain.state_dict(), "relative_bias": torch.zeros(2, 9)})
    _, inter, mask = features(batch=2, valid=(LENGTH, 40))
    memory = torch.randn(2, LENGTH, 16)
    with torch.no_grad():
        assert torch.equal(biased(inter[:, 0], memory, mask), plain(inter[:, 0], memory, mask))
        # A large bias on offset -3 (the key three steps earlier) makes every query with a
        # valid key there attend to it alone: the output is then that key's value.
        biased.relative_bias[:, 4 - 3] = 50.0
        out = biased(inter[:, 0], memory, mask)
        q = biased.cross.project_query(inter[:, 0], pool_tokens=True)
        _, values = biased.cross.keys_values(memory)
        expected = q[:, 3:] + biased.cross.out(values[:, :-3])
        assert torch.allclose(out[0, 3:], expected[0], atol=1e-5)
        assert torch.allclose(out[1, 3:40], expected[1, :37], atol=1e-5)
    biased.train()
    biased(inter[:, 0], memory, mask).sum().backward()
    assert biased.relative_bias.grad.abs().sum() > 0


def test_relative_bias_needs_a_band():
    with pytest.raises(ValueError, match="needs a long_window"):
        small_losa(long_relative_bias=True)


def test_losa_config_is_the_constructor_signature_with_its_defaults():
    import dataclasses
    import inspect

    from adapt import LosaConfig

    parameters = dict(inspect.signature(LoSA.__init__).parameters)
    for name in ("self", "dim", "num_layers", "num_tokens"):
        del parameters[name]
    assert {name: p.default for name, p in parameters.items()} == \
        dataclasses.asdict(LosaConfig())
    config = LosaConfig(bottleneck=16, num_heads=2, adapters="short")
    built = LoSA.from_config(DIM, LAYERS, TOKENS, config)
    assert count_trainable_parameters(built) == losa_parameter_count(
        DIM, LAYERS, TOKENS, **dataclasses.asdict(config))
    assert not hasattr(built, "long")
