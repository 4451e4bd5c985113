"""The detection head: target assignment on hand-made and real THUMOS cases, losses, the loss
normaliser in checkpoints, masking, decoding, and learning a small detection problem."""
import json
import math
from pathlib import Path

import pytest
import torch

from head import ActionFormerHead, assign_targets, make_points
from head.losses import diou_loss, sigmoid_focal_loss
from head.model import THUMOS_REGRESSION_RANGES
from head.nms import segment_iou
from helpers import REPO
from helpers.evaluation_inputs import ACTIONFORMER_FILE, needs_thumos

THUMOS = Path(ACTIONFORMER_FILE)
STRIDES = [1, 2, 4, 8, 16, 32]
LENGTH = 64


def thumos_points(length=LENGTH):
    lengths = [math.ceil(length / s) for s in STRIDES]
    return make_points(lengths, STRIDES, THUMOS_REGRESSION_RANGES)


def assign(segments, labels, num_classes=3, radius=1.5, length=LENGTH):
    points = thumos_points(length)
    cls, reg = assign_targets(points, torch.tensor(segments, dtype=torch.float32),
                              torch.tensor(labels), num_classes, radius)
    return points, cls, reg


def positives(points, cls, reg):
    """{(stride, position): (labels, start offset, end offset)} of the assigned points."""
    found = {}
    for p in torch.nonzero(cls.sum(1) > 0).squeeze(1).tolist():
        key = (int(points.stride[p]), float(points.position[p]))
        found[key] = (torch.nonzero(cls[p]).squeeze(1).tolist(), *reg[p].tolist())
    return found


def test_one_segment_is_assigned_to_the_level_whose_range_fits_near_its_centre():
    # Centre 20, centre region +-6 at stride 4; the farthest end is 10 to 14 steps away: level 2.
    got = positives(*assign([[10.0, 30.0]], [1]))
    assert got == {(4, 16.0): ([1], 6 / 4, 14 / 4), (4, 20.0): ([1], 10 / 4, 10 / 4),
                   (4, 24.0): ([1], 14 / 4, 6 / 4)}


def test_regression_ranges_are_inclusive_at_both_ends():
    # From point 20 both ends of [12, 28] are 8 steps away: the top of (4, 8), the bottom of (8, 16).
    got = positives(*assign([[12.0, 28.0]], [0]))
    assert got[(2, 20.0)] == ([0], 4.0, 4.0)
    assert got[(4, 20.0)] == ([0], 2.0, 2.0)


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_the_shortest_qualifying_segment_wins_whatever_the_order(order):
    segments = [[[12.0, 28.0], 0], [[11.0, 30.0], 2]]
    listed = [segments[i] for i in order]
    got = positives(*assign([s for s, _ in listed], [lab for _, lab in listed]))
    for position in (16.0, 20.0, 24.0):
        labels, to_start, to_end = got[(4, position)]
        assert labels == [0]
        assert (position - 4 * to_start, position + 4 * to_end) == (12.0, 28.0)


def test_identical_segments_with_different_labels_give_multi_label_points():
    got = positives(*assign([[10.0, 30.0], [40.0, 44.0], [10.0, 30.0]], [2, 1, 0]))
    assert got[(4, 20.0)] == ([0, 2], 2.5, 2.5)
    assert all(labels == [1] for (_, position), (labels, *_) in got.items() if position > 35)


def test_a_point_exactly_on_the_centre_region_edge_is_not_positive():
    # [10, 30], radius 1: at stride 4 the centre region is [16, 24]. Points 16 and 24 lie on its
    # edges (and their reach 14 fits (8, 16)), yet only 20 is positive: ActionFormer's test is
    # strict. No other level has a point inside its region whose reach fits its range.
    assert positives(*assign([[10.0, 30.0]], [1], radius=1.0)) == {(4, 20.0): ([1], 2.5, 2.5)}


@pytest.mark.parametrize("end, shared", [(32.0, True), (32.0005, True), (32.01, False)])
def test_equally_short_segments_all_give_their_labels_and_the_first_regresses(end, shared):
    # A = [10, 30] (label 0) and B = [12, end] (label 1): lengths 20 and end - 12. At stride 4,
    # 20 and 24 lie in both centre regions (A: [14, 26], B: [16, 28] with 16 on its edge).
    # Within 1e-3 of the shortest both labels are set; the regression goes to A, listed first.
    got = positives(*assign([[10.0, 30.0], [12.0, end]], [0, 1]))
    both = [0, 1] if shared else [0]
    assert got[(4, 20.0)] == (both, 2.5, 2.5)
    assert got[(4, 24.0)] == (both, 14 / 4, 6 / 4)
    assert got[(4, 16.0)] == ([0], 6 / 4, 14 / 4)


def test_centre_sampling_keeps_only_points_near_the_centre():
    # [13, 29], centre 21. Level 2 (stride 4, reach 8..16): 16, 20, 24 and 28 (reach 15) all fit
    # the range, but 28 lies 7 > 1.5 * 4 steps from the centre.
    near = positives(*assign([[13.0, 29.0]], [0], radius=1.5))
    anywhere = positives(*assign([[13.0, 29.0]], [0], radius=None))
    assert sorted(near) == [(4, 16.0), (4, 20.0), (4, 24.0)]
    assert sorted(anywhere) == [(4, 16.0), (4, 20.0), (4, 24.0), (4, 28.0)]
    assert anywhere[(4, 28.0)] == ([0], 15 / 4, 1 / 4)


def test_a_video_without_actions_has_no_positives():
    points, cls, reg = assign(torch.zeros(0, 2).tolist(), [])
    assert cls.shape == (points.position.shape[0], 3) and not cls.any() and not reg.any()


def test_bad_ground_truth_is_refused():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        assign([[1.0, 5.0]], [3])
    with pytest.raises(ValueError, match="start <= end"):
        assign([[5.0, 1.0]], [0])


def thumos_videos(subset="Validation", count=12, must_have="video_validation_0000170"):
    database = json.loads(THUMOS.read_text())["database"]
    classes = sorted({a["label"] for v in database.values() for a in v["annotations"]})
    names = [v for v in sorted(database) if database[v]["subset"] == subset][:count]
    names.append(must_have)
    return classes, {name: database[name] for name in names}


@needs_thumos
def test_real_thumos_targets_point_at_ground_truth_with_all_of_its_labels():
    classes, videos = thumos_videos()
    multi_label_points = 0
    for name, video in videos.items():
        fps = video["fps"]
        # Feature step k covers frames 4k .. 4k+15; its time is the clip centre (4k + 8) / fps.
        to_step = lambda seconds: (seconds * fps - 8) / 4  # noqa: E731
        truth = {}
        for a in video["annotations"]:
            segment = (round(to_step(a["segment"][0]), 3), round(to_step(a["segment"][1]), 3))
            truth.setdefault(segment, set()).add(classes.index(a["label"]))
        length = math.ceil(video["duration"] * fps / 4 / 32) * 32
        points = thumos_points(length)
        segments = [s for s, labels in truth.items() for _ in labels]
        labels = [lab for labels in truth.values() for lab in sorted(labels)]
        cls, reg = assign_targets(points, torch.tensor(segments), torch.tensor(labels),
                                  len(classes))
        positive = torch.nonzero(cls.sum(1) > 0).squeeze(1)
        assert positive.numel() > 0, name
        for p in positive.tolist():
            stride, position = float(points.stride[p]), float(points.position[p])
            segment = (position - stride * float(reg[p, 0]), position + stride * float(reg[p, 1]))
            match = [s for s in truth if max(abs(s[0] - segment[0]), abs(s[1] - segment[1])) < 1e-2]
            assert len(match) == 1, (name, segment)
            assert set(torch.nonzero(cls[p]).squeeze(1).tolist()) == truth[match[0]]
            multi_label_points += len(truth[match[0]]) > 1
    assert multi_label_points > 0    # e.g. Diving + CliffDiving in video_validation_0000170


def test_focal_and_diou_losses_on_hand_computed_values():
    logits, targets = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])
    prob = torch.sigmoid(logits)
    expected = [0.25 * (1 - prob[0]) ** 2 * -torch.log(prob[0]),
                0.75 * prob[1] ** 2 * -torch.log(1 - prob[1]),
                torch.tensor(0.25 * 0.5 ** 2 * math.log(2))]
    expected = [float(e) for e in expected]
    assert sigmoid_focal_loss(logits, targets).tolist() == pytest.approx(expected)
    # pred [-1, 1] vs truth [-1, 3] around the point: IoU 2/4, centres 0 and 1, enclosure 4.
    pred, truth = torch.tensor([[1.0, 1.0], [2.0, 3.0]]), torch.tensor([[1.0, 3.0], [2.0, 3.0]])
    assert diou_loss(pred, truth).tolist() == pytest.approx([0.5 + 1 / 16, 0.0])


def small_head(**kwargs):
    options = dict(embed_dim=32, num_heads=2, drop_path=0.0, window=3, max_seq_len=64)
    options.update(kwargs)
    return ActionFormerHead(16, 3, **options)


def inputs(length=50, valid=(50, 30), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(len(valid), length, 16, generator=generator)
    mask = torch.arange(length)[None] < torch.tensor(valid)[:, None]
    return x, mask


def test_forward_builds_six_levels_over_a_padded_sequence():
    torch.manual_seed(0)
    out = small_head().eval()(*inputs())
    assert [o.shape[1] for o in out["cls_logits"]] == [64, 32, 16, 8, 4, 2]
    assert [m[1].sum().item() for m in out["masks"]] == [30, 15, 8, 4, 2, 1]
    assert all((o >= 0).all() for o in out["offsets"])
    # The prior bias: every class starts near 1% foreground probability.
    assert 0.003 < torch.sigmoid(torch.cat(out["cls_logits"], 1)).median() < 0.03


def test_padding_content_never_reaches_valid_points():
    torch.manual_seed(0)
    head = small_head().eval()
    x, mask = inputs()
    noisy = x.clone()
    noisy[~mask] = 100.0
    clean_out, noisy_out = head(x, mask), head(noisy, mask)
    for key in ("cls_logits", "offsets"):
        for clean, dirty, level_mask in zip(clean_out[key], noisy_out[key], clean_out["masks"]):
            assert torch.allclose(clean[level_mask], dirty[level_mask], atol=1e-5)


def test_inputs_are_padded_to_max_seq_len_or_to_a_multiple_of_the_padding_factor():
    torch.manual_seed(0)
    head = small_head(window=5, max_seq_len=128).eval()      # factor 32 x (5 // 2) x 2 = 128
    with torch.no_grad():    # as after training: LayerNorm maps zeros to a non-zero bias
        for norm in (m for m in head.modules() if isinstance(m, torch.nn.LayerNorm)):
            norm.bias.normal_()
    assert [head.padded_length(n) for n in (1, 128, 129, 256, 257)] == [128, 128, 256, 256, 384]
    x, mask = inputs(length=128, valid=(128,))
    # A short input is padded to max_seq_len: the same as padding it there by hand.
    short = head(x[:, :100], mask[:, :100])
    by_hand = head(torch.cat([x[:, :100], torch.zeros(1, 28, 16)], 1),
                   torch.arange(128)[None] < 100)
    assert [o.shape[1] for o in short["cls_logits"]] == [128, 64, 32, 16, 8, 4]
    for a, b in zip(short["cls_logits"], by_hand["cls_logits"]):
        assert torch.equal(a, b)
    # A video that fills max_seq_len exactly has no padding after it, and that matters: with
    # padding (an input of 129 steps goes to 256), the valid points near its end read the
    # LayerNorm biases at the padded steps, as in ActionFormer.
    full = head(x, mask)
    longer = head(torch.cat([x, torch.zeros(1, 1, 16)], 1), torch.arange(129)[None] < 128)
    assert longer["cls_logits"][0].shape[1] == 256
    exact, padded = full["cls_logits"][0][0], longer["cls_logits"][0][0, :128]
    assert torch.allclose(exact[:100], padded[:100], atol=1e-5)
    assert not torch.allclose(exact[-1], padded[-1], atol=1e-3)


def batch_targets():
    return [{"segments": torch.tensor([[5.0, 20.0], [30.0, 33.0]]), "labels": torch.tensor([1, 0])},
            {"segments": torch.tensor([[2.0, 12.0]]), "labels": torch.tensor([2])}]


def test_loss_normaliser_is_an_ema_of_positives_saved_in_checkpoints():
    torch.manual_seed(0)
    head = small_head(loss_norm_init=100.0, loss_norm_momentum=0.9)
    out = head(*inputs())
    losses = head.loss(out, batch_targets())
    count = int(losses["num_positives"])
    assert count > 0 and torch.isfinite(losses["total"])
    assert head.loss_normalizer.item() == pytest.approx(0.9 * 100 + 0.1 * count)
    head.update_loss_normalizer(7)                   # e.g. once per step, a global count
    assert head.loss_normalizer.item() == pytest.approx(0.9 * (90 + 0.1 * count) + 0.7)
    frozen = head.loss_normalizer.item()
    head.loss(out, batch_targets(), update_normalizer=False)
    head.eval()
    head.loss(out, batch_targets())
    assert head.loss_normalizer.item() == frozen     # asked not to, or evaluating: unchanged
    resumed = small_head()
    resumed.load_state_dict(head.state_dict())
    assert torch.equal(resumed.loss_normalizer, head.loss_normalizer)


def test_loss_without_any_positive_still_reaches_every_parameter():
    torch.manual_seed(0)
    head = small_head()
    empty = [{"segments": torch.zeros(0, 2), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = head.loss(head(*inputs()), empty)
    assert losses["reg"].item() == 0
    losses["total"].backward()
    assert all(p.grad is not None for p in head.parameters())


def test_decoding_maps_offsets_to_feature_steps():
    head = small_head()
    levels = [64, 32, 16, 8, 4, 2]
    out = {"cls_logits": [torch.full((1, n, 3), -20.0) for n in levels],
           "offsets": [torch.ones(1, n, 2) for n in levels],
           "masks": [torch.ones(1, n, dtype=torch.bool) for n in levels]}
    out["cls_logits"][1][0, 5, 2] = 3.0           # level 1 (stride 2), point at step 10
    out["offsets"][1][0, 5] = torch.tensor([1.5, 2.5])
    out["cls_logits"][3][0, 1, 0] = 1.0           # level 3 (stride 8), point at step 8
    out["masks"][3][0, 1] = False                 # ... but padded: never reported
    (det,) = head.predict(out, nms_method="hard")
    assert det["segments"].tolist() == [[7.0, 15.0]]
    assert det["labels"].tolist() == [2]
    assert det["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item()])


def test_head_learns_to_localise_a_small_detection_problem():
    """Class 1 wherever channel 0 is raised, class 2 wherever channel 1 is: learn, then find them."""
    torch.manual_seed(0)
    head = small_head(drop_path=0.0)
    x, mask = inputs(length=64, valid=(64, 64), seed=3)
    x = 0.1 * x
    x[0, 10:30, 0] += 2.0
    x[1, 40:48, 1] += 2.0
    targets = [{"segments": torch.tensor([[10.0, 29.0]]), "labels": torch.tensor([1])},
               {"segments": torch.tensor([[40.0, 47.0]]), "labels": torch.tensor([2])}]
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-3)
    for _ in range(60):
        optimizer.zero_grad()
        head.loss(head(x, mask), targets)["total"].backward()
        optimizer.step()
    head.eval()
    detections = head.predict(head(x, mask), max_segments=10)
    for det, target in zip(detections, targets):
        assert det["scores"].shape[0] <= 10
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
        assert det["labels"][0] == target["labels"][0]
        assert segment_iou(det["segments"][0], target["segments"][0]) > 0.8


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    from head.blocks import AffineDropPath

    drop = AffineDropPath(5, 0.25)
    assert drop.scale.tolist() == pytest.approx([1e-4] * 5)   # LayerScale's start
    with torch.no_grad():
        drop.scale.fill_(1.0)
    x = torch.ones(4000, 3, 5)
    torch.manual_seed(0)
    out = drop.train()(x)
    per_sample = out.flatten(1)
    # Each sample is either dropped entirely or kept and scaled by 1 / (1 - rate).
    assert torch.allclose(per_sample.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)
    assert abs((per_sample[:, 0] == 0).float().mean().item() - 0.25) < 0.03
    assert abs(out.mean().item() - 1.0) < 0.04
    assert torch.equal(drop.eval()(x), x)


def test_stage_two_does_not_import_timm():
    # timm takes seconds to import; train/infer/evaluate start-up should not pay for it.
    import subprocess
    import sys

    code = ("import sys, adapt, head, training.train, training.infer, evaluation; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_under_bf16_autocast_the_predictions_are_computed_in_float32():
    torch.manual_seed(0)
    head = small_head().eval()
    x, mask = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, mask)
    assert all(o.dtype == torch.float32 for o in out["cls_logits"] + out["offsets"])
    # bf16 keeps 8 bits of mantissa: float32 logits near the 1% prior rarely tie.
    logits = out["cls_logits"][0][out["masks"][0]].flatten()
    assert logits.unique().numel() > 0.9 * logits.numel()


@pytest.mark.parametrize("arguments", [
    {},  # the THUMOS defaults
    {"embed_dim": 30, "num_heads": 3, "max_seq_len": 96, "window": [3, 5, 7, -1],
     "num_levels": 4, "drop_path": 0.0, "use_abs_pe": True, "num_embed_convs": 1,
     "num_stem_blocks": 0, "tower_depth": 0, "mlp_ratio": 2.5,
     "regression_ranges": [[0, 4], [4, 8], [8, 16], [16, None]]},
])
def test_head_config_builds_the_head_and_counts_its_weights_without_building_it(arguments):
    from head.config import HeadConfig, head_parameter_count

    config = HeadConfig(**arguments)
    head = ActionFormerHead.from_config(16, 5, config)
    built = sum(t.numel() for t in (*head.parameters(), *head.buffers()))
    assert head_parameter_count(config, 16, 5) == built
    assert len(head.strides) == config.num_levels
    assert head.regression_ranges[-1][1] == math.inf


@pytest.mark.parametrize("arguments, key", [
    ({"window": 4}, "window"), ({"dropout": float("nan")}, "dropout"),
    ({"embed_dim": 30}, "embed_dim"), ({"regression_ranges": [[0, 4]] * 5}, "regression_ranges"),
    ({"regression_ranges": [[4, 0]] * 6}, "regression_ranges"),
    ({"center_sample_radius": float("nan")}, "center_sample_radius"),
])
def test_the_constructor_and_the_config_refuse_the_same_argument_by_name(arguments, key):
    from head.config import HeadConfig
    from losa_tal import ConfigError

    for build in (lambda: HeadConfig(**arguments).check(),
                  lambda: ActionFormerHead(16, 5, **arguments)):
        with pytest.raises(ConfigError, match=f"^{key}: must be") as err:
            build()
        assert err.value.key == key


def test_head_config_is_the_constructor_signature_with_its_defaults():
    import dataclasses
    import inspect

    from head.config import HeadConfig, open_ranges

    parameters = dict(inspect.signature(ActionFormerHead.__init__).parameters)
    for name in ("self", "in_dim", "num_classes"):
        del parameters[name]
    defaults = dataclasses.asdict(HeadConfig())
    assert list(parameters) == list(defaults)
    signature = {name: p.default for name, p in parameters.items()}
    assert open_ranges(signature.pop("regression_ranges")) == \
        open_ranges(defaults.pop("regression_ranges"))
    assert signature == defaults


@pytest.mark.parametrize("window, length, valid", [(3, 8, 8), (5, 13, 9), (19, 40, 40),
                                                   (19, 36, 20), (-1, 30, 17)])
def test_local_attention_equals_softmax_over_the_window_of_valid_keys(window, length, valid):
    from head.blocks import attention

    generator = torch.Generator().manual_seed(window + length)
    q, k, v = (torch.randn(2, 3, length, 8, generator=generator) for _ in range(3))
    mask = torch.arange(length)[None] < torch.tensor([length, valid])[:, None]
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    steps = torch.arange(length)
    allowed = mask[:, None, None, :].expand_as(scores)
    if window != -1:
        allowed = allowed & ((steps[:, None] - steps[None, :]).abs() <= window // 2)
    expected = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    got = attention(q, k, v, mask, window)
    rows = mask[:, None, :, None].expand_as(got)  # padded queries' rows are not defined
    assert torch.allclose(got[rows], expected[rows], atol=1e-5)


@pytest.mark.slow
def test_a_long_video_runs_in_memory_linear_in_its_length():
    # 40,000 steps: a dense T x T attention mask alone would take 1.6 GB, its scores 6.4 GB.
    from helpers.memory import peak_growth

    growth = peak_growth("""
        import torch
        from head import ActionFormerHead
        torch.set_num_threads(1)
        head = ActionFormerHead(8, 3, embed_dim=16, num_heads=2).eval()
        x = torch.randn(1, 40_000, 8)
        """, """
        with torch.no_grad():
            out = head(x, torch.ones(1, 40_000, dtype=torch.bool))
        assert out["cls_logits"][0].shape == (1, 40_320, 3)
        """)
    assert growth < 200 * 2**20, growth / 2**20
