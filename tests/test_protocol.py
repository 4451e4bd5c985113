"""The sampling protocol: which frames make each clip, the feature times, the stored record."""
import json

import numpy as np
import pytest

from store.protocol import SamplingProtocol
from losa_tal import ConfigError, InputError


def test_defaults_are_the_official_videomaev2_tal_protocol():
    protocol = SamplingProtocol()
    assert (protocol.clip_len, protocol.clip_stride, protocol.frame_interval) == (16, 4, 1)
    assert (protocol.fps, protocol.img_size) == (None, 224)
    assert (protocol.resize, protocol.normalise, protocol.tail) == ("direct", "none", "drop")


@pytest.mark.parametrize("num_frames", [16, 17, 19, 20, 21, 100, 5091])
def test_clip_starts_equal_the_official_range(num_frames):
    # extract_tad_feature.py: ``for start_idx in range(0, num_frames - 15, 4)``, frames start..start+15
    indices = SamplingProtocol().native_indices(num_frames, 30.0)
    official = [list(range(s, s + 16)) for s in range(0, num_frames - 15, 4)]
    assert indices.tolist() == official
    assert indices.max() <= num_frames - 1


@pytest.mark.parametrize("num_frames", [1, 2, 15])
def test_video_shorter_than_a_clip_gets_one_clip_padded_with_the_last_frame(num_frames):
    indices = SamplingProtocol().native_indices(num_frames, 25.0)
    assert indices.shape == (1, 16)
    expected = list(range(num_frames)) + [num_frames - 1] * (16 - num_frames)
    assert indices[0].tolist() == expected


def test_pad_tail_covers_the_last_frame():
    protocol = SamplingProtocol(tail="pad")
    indices = protocol.native_indices(22, 30.0)
    assert indices[:, 0].tolist() == [0, 4, 8]  # drop would stop at 4
    assert indices[-1].tolist() == list(range(8, 22)) + [21, 21]
    # An exact fit adds no padded clip.
    assert protocol.num_clips(20, 30.0) == SamplingProtocol().num_clips(20, 30.0) == 2


def test_frame_interval_spreads_the_clip():
    protocol = SamplingProtocol(clip_len=4, clip_stride=2, frame_interval=3)
    indices = protocol.native_indices(14, 30.0)
    assert indices.tolist() == [[0, 3, 6, 9], [2, 5, 8, 11], [4, 7, 10, 13]]
    assert np.allclose(protocol.feature_times(14, 30.0), (np.array([0, 2, 4]) + 6) / 30.0)


def test_feature_times_follow_the_clip_centre_convention():
    times = SamplingProtocol().feature_times(100, 29.97)
    assert times.dtype == np.float64
    starts = np.arange(0, 100 - 15, 4)
    assert np.array_equal(times, (starts + 8.0) / 29.97)


def test_resampled_timeline_maps_to_native_frames_on_screen():
    protocol = SamplingProtocol(clip_len=4, clip_stride=2, fps=15.0)
    # 30 fps native, 15 fps sampling: every other native frame.
    assert protocol.num_sampled_frames(31, 30.0) == 16
    assert protocol.native_indices(31, 30.0)[0].tolist() == [0, 2, 4, 6]
    times = protocol.feature_times(31, 30.0)
    assert np.allclose(times, (np.arange(len(times)) * 2 + 2) / 15.0)
    # Upsampling repeats native frames and never points past the last one.
    up = SamplingProtocol(clip_len=4, clip_stride=4, fps=50.0).native_indices(10, 25.0)
    assert up[0].tolist() == [0, 0, 1, 1] and up.max() == 9


def test_record_round_trips_through_json():
    protocol = SamplingProtocol(clip_len=8, clip_stride=2, fps=15.0, img_size=112,
                                resize="short_side_crop", normalise="imagenet", tail="pad")
    record = json.loads(json.dumps(protocol.to_dict()))
    assert "clip_centre" in record["time_convention"]
    assert record["decoding"].startswith("sequential")
    assert SamplingProtocol.from_dict(record) == protocol
    assert SamplingProtocol.from_dict(SamplingProtocol().to_dict()) == SamplingProtocol()


@pytest.mark.parametrize("bad", [{"clip_len": 0}, {"clip_stride": -4}, {"fps": float("nan")},
                                 {"fps": 0}, {"resize": "stretch"}, {"tail": "loop"},
                                 {"img_size": 22.5}, {"normalise": "kinetics"}])
def test_bad_values_are_refused_with_the_field_named(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        SamplingProtocol(**bad)


def test_unknown_record_keys_are_refused():
    with pytest.raises(InputError, match="unknown keys"):
        SamplingProtocol.from_dict({**SamplingProtocol().to_dict(), "crop": 1})


def test_a_store_of_another_decoding_policy_is_refused():
    old = {**SamplingProtocol().to_dict(), "decoding": "index seeks"}
    with pytest.raises(InputError, match="unsupported decoding policy"):
        SamplingProtocol.from_dict(old)


@pytest.mark.parametrize("fps", [None, 15.0])
def test_evenly_spaced_frame_times_give_the_constant_rate_answer(fps):
    protocol = SamplingProtocol(clip_len=8, clip_stride=4, fps=fps)
    times = np.arange(97) / 30.0
    assert np.array_equal(protocol.native_indices(97, 30.0, times),
                          protocol.native_indices(97, 30.0))
    assert np.allclose(protocol.feature_times(97, 30.0, times), protocol.feature_times(97, 30.0))


def test_variable_rate_times_pick_the_frame_on_screen_and_time_the_clip_centre():
    times = np.array([0.0, 0.1, 0.15, 0.4, 0.45, 0.5])  # 6 frames, 0.6 s (mean step 0.1 s)
    resampled = SamplingProtocol(clip_len=6, clip_stride=6, fps=10.0)
    assert resampled.num_sampled_frames(6, 10.0, times) == 6
    assert resampled.native_indices(6, 10.0, times).tolist() == [[0, 1, 2, 2, 3, 5]]
    native = SamplingProtocol(clip_len=2, clip_stride=2)
    # Clip centres at frames 1, 3 and 5; a padded clip would extrapolate by the mean step.
    assert np.allclose(native.feature_times(6, 10.0, times), [0.1, 0.4, 0.5])
    padded = SamplingProtocol(clip_len=4, clip_stride=4, tail="pad")
    assert np.allclose(padded.feature_times(6, 10.0, times), [0.15, 0.6])


def test_which_protocols_use_every_frame():
    assert SamplingProtocol().uses_every_frame  # the official protocol: the decoder reads all
    assert SamplingProtocol(clip_len=16, clip_stride=16).uses_every_frame
    assert not SamplingProtocol(clip_len=16, clip_stride=17).uses_every_frame
    assert not SamplingProtocol(fps=15.0).uses_every_frame
    assert not SamplingProtocol(frame_interval=2).uses_every_frame
