"""The ablation (bench/ablate.py) and the long-range measurements (bench/long_range.py): the
quick ablation through the real command (real benchmark, store, trainings), its resume and
refusals, the summary's arithmetic, and the head's receptive field worked out by hand."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from synth.ablate import VARIANTS, _write_outputs, summarise, table_markdown
from synth.generator import CONTEXT_CLASSES


def _ablate(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "ablate.py"), *args,
                           "--quiet"], capture_output=True, text=True, env=env)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_ablation_trains_every_variant_tabulates_and_resumes(tmp_path):
    out = tmp_path / "ablate"
    result = _ablate("--quick", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((out / "summary.json").read_text())
    assert written["context_classes"] == list(CONTEXT_CLASSES)  # the benchmark's own metadata
    summary = written["variants"]
    assert list(summary) == list(VARIANTS)
    for variant, s in summary.items():
        assert s["seeds"] == [0] and 0.0 <= s["mean"] <= 1.0 and s["std"] == 0.0
        assert f"| {variant} | 1 |" in result.stdout  # the table is printed
    # Each variant trained what it says: the checkpoints hold exactly its modules.
    keys = {v: set(torch.load(out / "runs" / v / "seed0" / "last.pt",
                              weights_only=True)["model"]) for v in VARIANTS}
    assert not any(k.startswith("losa.") for k in keys["head_only"])
    assert any(k.startswith("losa.short.") for k in keys["short"])
    assert not any(k.startswith("losa.long.") for k in keys["short"])
    assert any(k.startswith("losa.long.") for k in keys["long"])
    assert not any(k.startswith("losa.short.") for k in keys["long"])
    assert "losa.long.0.relative_bias" in keys["losa_relpos"]
    assert "losa.long.0.relative_bias" not in keys["losa"]
    for figure in ("ablation.png", "sensitivity.png"):
        assert _is_png(out / figure)
    assert (out / "table.md").read_text().count("\n") == len(VARIANTS) + 2

    # A rerun with the same settings trains nothing again; other settings are refused.
    result_file = out / "runs" / "losa" / "seed0" / "result.json"
    written = result_file.stat().st_mtime_ns
    again = _ablate("--quick", "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert result_file.stat().st_mtime_ns == written
    refused = _ablate("--quick", "--epochs", "3", "--out", str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"error: {out}: holds an ablation with other settings "
                                      "(benchmark or epochs); choose another --out or delete it")


def test_bad_options_are_one_line_errors(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cases = [(["--variants", "losa,medium"], "error: --variants: unknown variant 'medium'"),
             (["--train-seeds", "0,x"], "error: --train-seeds: expected comma-separated"),
             (["--out", str(foreign)], f"error: {foreign}: exists and holds no ablation")]
    for args, message in cases:
        result = _ablate("--quick", *(args if "--out" in args
                                      else [*args, "--out", str(tmp_path / "new")]))
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1


def test_summary_is_mean_and_sample_spread_over_seeds():
    def run(seed, score, dash):
        return {"seed": seed, "average_mAP": score, "train_seconds": 10.0, "sensitivity": {},
                "per_class_AP": {"dash": dash, "orbit_cw": 0.5}}

    summary = summarise({"losa": [run(0, 0.30, 0.1), run(1, 0.40, 0.3), run(2, 0.20, 0.2)],
                         "short": [], "long": [run(3, 0.25, 0.0)]})
    assert list(summary) == ["losa", "long"]                      # no finished run: no row
    assert summary["losa"]["mean"] == pytest.approx(0.30)
    assert summary["losa"]["std"] == pytest.approx(0.10)          # sqrt(0.02 / (3 - 1))
    assert summary["losa"]["per_class_mean"]["dash"] == pytest.approx(0.2)
    assert summary["losa"]["per_class_std"]["dash"] == pytest.approx(0.1)
    assert summary["long"]["std"] == 0.0                          # one seed: no spread
    table = table_markdown(summary)
    assert "| losa | 3 | 30.0 +- 10.0 | 20.0 | 50.0 |" in table


def test_written_table_has_one_row_per_variant(tmp_path):
    def run(seed, score):
        return {"seed": seed, "average_mAP": score, "train_seconds": 1.0, "sensitivity": {},
                "per_class_AP": {"dash": score, "shake_blue": score / 2}}

    # (no losa and head_only pair: no sensitivity figure, which needs real diagnoses)
    summary = summarise({"long": [run(0, 0.1)], "short": [run(0, 0.3), run(1, 0.4)],
                         "losa_gates": [run(0, 0.5), run(1, 0.2)]})
    _write_outputs(tmp_path, summary, ["shake_blue"])
    rows = (tmp_path / "table.md").read_text().splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| long", "| short", "| losa_gates"]
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["context_classes"] == ["shake_blue"]
    assert list(written["variants"]) == ["long", "short", "losa_gates"]


def test_head_receptive_field_matches_the_layers_worked_out_by_hand(monkeypatch):
    """Level 0: two embedding convs (k3: 2 steps), two stem blocks (q/k/v conv k3 + local
    attention of window 9: 1 + 4 steps each) and the tower (3 convs k3: 3 steps): 15. Level 1
    adds a strided block on the stem's 12 (k/v conv k3 stride 2: 1 step, attention 4 level-1
    steps = 8) and a tower of 3 level-1 steps (6): 12 + 9 + 6 = 27."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # bench/extract.py shadows extract
    from long_range import receptive_field

    reach = receptive_field()
    assert [(r["steps_before"], r["steps_after"]) for r in reach[:2]] == [(15, 15), (27, 27)]


def test_a_run_another_process_finished_is_read_not_retrained(tmp_path):
    from synth.ablate import train_and_score

    run_dir = tmp_path / "runs" / "long" / "seed3"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"variant": "long", "seed": 3}))
    # No store and no benchmark exist: any training attempt would fail.
    assert train_and_score("long", 3, tmp_path / "missing.zarr", tmp_path, None) == \
        {"variant": "long", "seed": 3}


def test_cue_probe_reads_the_colour_where_the_cue_is_and_counts_its_clips(monkeypatch):
    """bench/long_range.py's step 5 on planted features: the colour (+-2 on one channel) lies
    only in the clips a cue overlaps, a marker (+4 on another) tells those clips apart. The
    colour probe on the cue's clips is right on every test video, the clip probe ranks the cue's
    clips first, and the base rate is the share of cue clips among the test clips."""
    from types import SimpleNamespace

    import numpy as np

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from long_range import probe_cue

    from synth.generator import Segment

    rng = np.random.default_rng(0)
    frames = np.array([[4 * t, 4 * t + 16] for t in range(40)], dtype=np.float64)
    videos = []
    for index in range(24):
        label = CONTEXT_CLASSES[index % 2]
        start = int(rng.integers(0, 120))
        cue = Segment("cue", start, start + 15, (0.0, 0.0), params={"label": label})
        lit = (frames[:, 0] < cue.stop) & (cue.start < frames[:, 1])
        last = rng.normal(size=(40, 6))
        last[lit, 0] += 2.0 if label == CONTEXT_CLASSES[0] else -2.0
        last[lit, 1] += 4.0
        videos.append({"subset": "train" if index < 16 else "test", "frames": frames,
                       "plan": SimpleNamespace(segments=[cue]), "views": {"last": last}})
    result = probe_cue(videos)
    assert result["test_videos"] == 8 and result["majority_accuracy"] == 0.5
    assert result["colour_accuracy"]["the cue's clips"] == 1.0
    lit_test = sum(int(((v["frames"][:, 0] < v["plan"].segments[0].stop)
                        & (v["plan"].segments[0].start < v["frames"][:, 1])).sum())
                   for v in videos[16:])
    assert result["cue_clip_rate"] == lit_test / (8 * 40)
    assert result["cue_clip_AP"] > 0.95
