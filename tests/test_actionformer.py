"""Our head against ActionFormer, by numbers: the same weights give the same outputs, targets,
losses and Soft-NMS detections as the plain reference written from the official code
(tests/helpers/reference_actionformer.py); and loading official-layout weights checks every key."""
import pytest
import torch

from head import ActionFormerHead
from head.actionformer import actionformer_name, load_actionformer_weights
from helpers.reference_actionformer import (PtTransformer, band_scores, band_times_values,
                                            batched_soft_nms, look_trained, seg_voting)

IN_DIM, CLASSES = 16, 3
RECIPES = {
    # THUMOS-like: local windows everywhere; padding factor 32 x 4 = 128
    "thumos": dict(window=5, use_abs_pe=False),
    # ActivityNet-like: global attention at the top level and the absolute position encoding
    "anet": dict(window=[5, 5, 5, 5, 5, -1], use_abs_pe=True),
}


def reference(recipe, num_classes=CLASSES, **extra):
    torch.manual_seed(0)
    options = RECIPES[recipe]
    model = PtTransformer(IN_DIM, num_classes, dim=32, n_head=2, max_seq_len=128,
                          window=options["window"], use_abs_pe=options["use_abs_pe"],
                          path_pdrop=0.1, **extra)
    return look_trained(model).eval()


def ours(recipe, state, num_classes=CLASSES, **extra):
    options = RECIPES[recipe]
    head = ActionFormerHead(IN_DIM, num_classes, embed_dim=32, num_heads=2, max_seq_len=128,
                            window=options["window"], use_abs_pe=options["use_abs_pe"],
                            drop_path=0.1, **extra)
    load_actionformer_weights(head, state)
    return head.eval()


def video(length, seed):
    return torch.randn(length, IN_DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("length", [100, 128, 300])  # padded to 128, none, 384
def test_same_weights_give_actionformers_outputs_and_detections(recipe, length):
    ref = reference(recipe)
    head = ours(recipe, {"module." + k: v for k, v in ref.state_dict().items()})
    x = video(length, seed=length)
    with torch.no_grad():
        ref_cls, ref_off, ref_masks = ref.network([x.T])
        out = head(x[None], torch.ones(1, length, dtype=torch.bool))
    for key, expected in (("cls_logits", ref_cls), ("offsets", ref_off), ("masks", ref_masks)):
        assert [o.shape for o in out[key]] == [e.shape for e in expected]
        for got, want in zip(out[key], expected):
            assert torch.allclose(got.float(), want.float(), atol=1e-4, rtol=0), key
    # Post-processing: per-class Soft-NMS without voting, at most 200 per video.
    rows = batched_soft_nms(*ref.candidates(ref_cls, ref_off, ref_masks))
    (det,) = head.predict(out, max_segments=200)
    got = torch.cat([det["segments"], det["scores"][:, None], det["labels"][:, None].float()], 1)
    assert got.shape[0] == len(rows) > 50
    assert torch.allclose(got, torch.tensor(rows), atol=1e-4, rtol=0)


@pytest.mark.parametrize("length", [300])
def test_class_agnostic_soft_nms_with_voting_gives_actionformers_detections(length):
    # ActivityNet: one class, Gaussian Soft-NMS (sigma 0.75), at most 100, then voting (0.9 in
    # the recipe; 0.5 here, where random weights give few segments that overlap by 0.9).
    ref = reference("anet", num_classes=1)
    head = ours("anet", ref.state_dict(), num_classes=1)
    x = video(length, seed=length)
    with torch.no_grad():
        ref_out = ref.network([x.T])
        out = head(x[None], torch.ones(1, length, dtype=torch.bool))
    segs, scores, labels = ref.candidates(*ref_out)
    rows = seg_voting(batched_soft_nms(segs, scores, labels, max_seg_num=100, sigma=0.75),
                      segs, scores, 0.5)
    (det,) = head.predict(out, sigma=0.75, max_segments=100, voting_iou=0.5)
    got = torch.cat([det["segments"], det["scores"][:, None], det["labels"][:, None].float()], 1)
    assert got.shape[0] == len(rows) > 50
    assert torch.allclose(got, torch.tensor(rows), atol=1e-4, rtol=0)
    (unvoted,) = head.predict(out, sigma=0.75, max_segments=100)
    assert (unvoted["segments"] - det["segments"]).abs().max() > 1e-2   # voting moved some


def loss_case():
    """Two videos (one padded) with ground truth, as the reference and as our head take them."""
    lengths = (128, 90)
    feats = [video(n, seed=n) for n in lengths]
    # Boundary cases on purpose: integer ends, an action at the very start, equal lengths.
    segments = [torch.tensor([[3.0, 40.0], [10.0, 14.0], [20.0, 24.0], [60.0, 127.0]]),
                torch.tensor([[0.0, 8.0], [30.0, 38.5], [31.0, 39.5], [31.0, 39.5]])]
    labels = [torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 2])]
    batch = torch.zeros(2, 128, IN_DIM)
    for i, f in enumerate(feats):
        batch[i, :f.shape[0]] = f
    mask = torch.arange(128)[None] < torch.tensor(lengths)[:, None]
    targets = [{"segments": s, "labels": lab} for s, lab in zip(segments, labels)]
    return feats, segments, labels, (batch, mask, targets)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_weights_give_actionformers_targets_and_losses(recipe):
    smoothing = {"thumos": 0.0, "anet": 0.1}[recipe]
    weight = {"thumos": 1.0, "anet": 2.0}[recipe]
    ref = reference(recipe, label_smoothing=smoothing, loss_weight=weight)
    head = ours(recipe, ref.state_dict(), label_smoothing=smoothing, reg_loss_weight=weight)
    feats, segments, labels, (batch, mask, targets) = loss_case()
    with torch.no_grad():
        expected = ref.losses([f.T for f in feats], segments, labels)
        out = head(batch, mask)
        got = head.loss(out, targets, update_normalizer=True)
        cls, reg = head.assign(out, targets)
        points = ref.points([m.shape[1] for m in out["masks"]])
    for cls_targets, reg_targets, s, lab in zip(cls, reg, segments, labels):
        want_cls, want_reg = ref.label_points_single_video(points, s, lab)
        assert torch.equal(cls_targets, want_cls)
        positive = want_cls.sum(1) > 0
        assert torch.allclose(reg_targets[positive], want_reg[positive], atol=1e-6)
    assert int(got["num_positives"]) == expected["num_pos"] > 0
    assert head.loss_normalizer.item() == pytest.approx(ref.loss_normalizer, rel=1e-6)
    for ours_key, ref_key in (("cls", "cls_loss"), ("reg", "reg_loss"), ("total", "final_loss")):
        assert got[ours_key].item() == pytest.approx(expected[ref_key].item(), rel=1e-4)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_same_weights_give_actionformers_gradients(recipe):
    # Our loss zeroes padding and negatives where ActionFormer indexes them out: the same
    # gradient for every parameter (the loss normaliser moved first in both).
    smoothing = {"thumos": 0.0, "anet": 0.1}[recipe]
    ref = reference(recipe, label_smoothing=smoothing)
    head = ours(recipe, ref.state_dict(), label_smoothing=smoothing)
    feats, segments, labels, (batch, mask, targets) = loss_case()
    ref.losses([f.T for f in feats], segments, labels)["final_loss"].backward()
    head.loss(head(batch, mask), targets, update_normalizer=True)["total"].backward()
    theirs = dict(ref.named_parameters())
    reached = 0
    for name, param in head.named_parameters():
        want = theirs[actionformer_name(name)].grad.reshape(param.shape)
        assert torch.allclose(param.grad, want, rtol=1e-4, atol=1e-6), name
        reached += bool(want.any())
    assert reached > 0.9 * len(theirs)   # (a level without positives leaves its scale alone)


@pytest.mark.parametrize("half, length", [(1, 4), (2, 8), (9, 36), (9, 72)])
def test_the_references_sliding_chunk_attention_is_the_banded_product(half, length):
    # The yardstick's own check: its chunked computation against the plain dense one.
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(3, length, 5, generator=generator) for _ in range(3))
    offset = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query
    dense = (q @ k.transpose(1, 2)).masked_fill(offset.abs() > half, float("-inf"))
    band = band_scores(q, k, half)
    for j in range(2 * half + 1):  # column j: key t + j - half, -inf beyond the sequence
        keys = torch.arange(length) + j - half
        inside = (keys >= 0) & (keys < length)
        want = torch.full((3, length), float("-inf"))
        want[:, inside] = dense[:, inside.nonzero()[:, 0], keys[inside]]
        assert torch.allclose(band[:, :, j], want, atol=1e-5)
    assert torch.allclose(band_times_values(band.softmax(-1), v, half), dense.softmax(-1) @ v,
                          atol=1e-5)


def test_loading_accepts_training_checkpoints_and_prefers_the_ema_weights():
    ref = reference("thumos")
    state = ref.state_dict()
    ema = {k: v + 1.0 for k, v in state.items()}
    head = ours("thumos", {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()},
                           "state_dict_ema": {"module." + k: v for k, v in ema.items()},
                           "optimizer": {}})
    name = "cls_tower.predict.conv.bias"
    assert torch.equal(head.state_dict()[name], ema[actionformer_name(name)])
    head = ours("thumos", {"state_dict": state})
    assert torch.equal(head.state_dict()[name], state[actionformer_name(name)])


def test_a_bad_key_is_one_error_naming_them_all_and_the_head_is_unchanged():
    state = reference("thumos").state_dict()
    head = ActionFormerHead(IN_DIM, CLASSES, embed_dim=32, num_heads=2, max_seq_len=128,
                            window=5, drop_path=0.1)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    broken = dict(state)
    del broken["neck.fpn_norms.2.weight"]
    broken["backbone.extra.weight"] = torch.zeros(1)
    broken["cls_head.cls_head.conv.weight"] = torch.zeros(4, 32, 3)
    with pytest.raises(ValueError) as err:
        load_actionformer_weights(head, broken)
    message = str(err.value)
    assert "\n" not in message
    for part in ("missing: neck.fpn_norms.2.weight", "unexpected: backbone.extra.weight",
                 "mis-shaped: cls_head.cls_head.conv.weight (4, 32, 3) (expected (3, 32, 3))"):
        assert part in message
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())


# ---------------------------------------------------------------------------------------------
# cli.py convert actionformer: official checkpoint + YAML -> run directory -> infer

YAML = """\
dataset_name: thumos
dataset: {{
  json_file: {annotations},
  num_classes: 3,
  input_dim: 16,
  feat_stride: 4,
  num_frames: 16,
  max_seq_len: 128,
}}
model: {{
  fpn_type: identity,
  n_mha_win_size: 5,
  n_head: 2,
  embd_dim: 32,
  fpn_dim: 32,
  head_dim: 32,
{extra}}}
opt: {{learning_rate: 0.0001, epochs: 30, weight_decay: 0.05}}
loader: {{batch_size: 2}}
train_cfg: {{init_loss_norm: 100, droppath: 0.1}}
test_cfg: {{pre_nms_topk: 2000, max_seg_num: 200, min_score: 0.001, multiclass_nms: True}}
"""


def convert_files(tmp_path, extra=""):
    from helpers.training import CLASSES, synthetic_videos, write_annotations, write_store

    videos = synthetic_videos(2, "test", num_steps=150)
    for video in videos.values():
        for a in video["annotations"]:
            a["label_id"] = CLASSES.index(a["label"])
    store = write_store(tmp_path / "store.zarr", videos, layers=())
    annotations = write_annotations(tmp_path / "gt.json", videos)
    ref = reference("thumos")
    weights = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"epoch": 35, "state_dict": {k: v * 0 for k, v in weights.items()},
                "state_dict_ema": weights, "optimizer": {}}, tmp_path / "af.pth.tar")
    (tmp_path / "af.yaml").write_text(YAML.format(annotations=annotations, extra=extra))
    return ref, videos, store, annotations


def cli(*args):
    from click.testing import CliRunner

    import cli as cli_module

    return CliRunner().invoke(cli_module.main, [str(a) for a in args])


def test_converted_checkpoint_infers_what_actionformer_predicts(tmp_path):
    from helpers.training import CLASSES

    ref, videos, store, annotations = convert_files(tmp_path)
    result = cli("convert", "actionformer", "--checkpoint", tmp_path / "af.pth.tar", "--config",
                 tmp_path / "af.yaml", "--store", store, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    result = cli("infer", "--run", tmp_path / "run", "--store", store, "--annotations",
                 annotations, "--subset", "test", "--out", tmp_path / "preds.json", "--quiet")
    assert result.exit_code == 0, result.output
    import json
    predictions = json.loads((tmp_path / "preds.json").read_text())["results"]
    for vid, video in videos.items():
        with torch.no_grad():
            outputs = ref.network([torch.from_numpy(video["last"]).T])
            rows = batched_soft_nms(*ref.candidates(*outputs))
        duration = float(video["times"][-1] + 0.3)
        expected = []
        for start, end, score, label in rows:  # ActionFormer's grid -> seconds, then clipped
            start, end = ((min(max((t * 4 + 8) / 30, 0.0), duration)) for t in (start, end))
            if end > start:
                expected.append((start, end, score, CLASSES[label]))
        got = predictions[vid]
        assert len(got) == len(expected) > 50
        for entry, (start, end, score, label) in zip(got, expected):
            assert entry["label"] == label
            assert entry["score"] == pytest.approx(score, abs=1e-4)
            assert entry["segment"] == pytest.approx([start, end], abs=2e-3)


@pytest.mark.parametrize("extra, key", [("  use_rel_pe: True,\n", "model.use_rel_pe"),
                                        ("  fpn_type: fpn,\n", "model.fpn_type")])
def test_an_option_we_do_not_reproduce_is_a_one_line_error(tmp_path, extra, key):
    _, _, store, _ = convert_files(tmp_path, extra=extra)
    result = cli("convert", "actionformer", "--checkpoint", tmp_path / "af.pth.tar", "--config",
                 tmp_path / "af.yaml", "--store", store, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.output.strip().startswith(f"error: {tmp_path / 'af.yaml'}: {key}: ")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
