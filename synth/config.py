"""What the synthetic benchmark generates: a small dataclass, importable without numpy (the
command line reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from losa_tal import check_values


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; every field is a command-line option of ``cli.py synth``
    (``min_seconds`` is ``--min-seconds``)."""

    videos: int = 40
    seed: int = 0
    size: int = 64                 # frames are size x size pixels
    fps: int = 15
    min_seconds: float = 25.0
    max_seconds: float = 45.0
    test_fraction: float = 0.25    # the last videos (by index) form the test subset
    # The global-context classes (synth/generator.py, CONTEXT_CLASSES). Off, the videos are
    # those of benchmark version 1 byte for byte, so the demo's published numbers still hold.
    context: bool = False

    def check(self) -> None:
        """Raise ConfigError, naming the field, on values that cannot make a benchmark."""
        check_values([
            ("videos", self.videos >= 2, "at least 2 (one train, one test video)", self.videos),
            ("seed", self.seed >= 0, "zero or more", self.seed),
            ("size", self.size >= 32 and self.size % 16 == 0, "a multiple of 16, at least 32",
             self.size),
            ("fps", 5 <= self.fps <= 60, "between 5 and 60", self.fps),
            ("min_seconds", 8.0 <= self.min_seconds <= self.max_seconds,
             "at least 8 and at most `max_seconds`", self.min_seconds),
            ("max_seconds", self.max_seconds <= 3600, "at most 3600", self.max_seconds),
            ("test_fraction", 0.0 < self.test_fraction < 1.0, "between 0 and 1",
             self.test_fraction),
        ])  # NaN fails every comparison, so it is refused too

    def subset_of(self, index: int) -> str:
        num_test = max(1, min(self.videos - 1, round(self.videos * self.test_fraction)))
        return "test" if index >= self.videos - num_test else "train"
