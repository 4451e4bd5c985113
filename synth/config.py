"""What the synthetic benchmark generates: a small dataclass, importable without numpy (the
command line reads its defaults)."""
from __future__ import annotations

from dataclasses import dataclass

from losa_tal import input_error


@dataclass(frozen=True)
class SynthConfig:
    """What to generate; every field is a command-line option of ``cli.py synth``."""

    videos: int = 40
    seed: int = 0
    size: int = 64                 # frames are size x size pixels
    fps: int = 15
    min_seconds: float = 25.0
    max_seconds: float = 45.0
    test_fraction: float = 0.25    # the last videos (by index) form the test subset

    def check(self) -> None:
        """Raise InputError, naming the option, on values that cannot make a benchmark."""
        rules = [
            ("--videos", self.videos >= 2, "must be at least 2 (one train, one test video)"),
            ("--seed", self.seed >= 0, "must be zero or more"),
            ("--size", self.size >= 32 and self.size % 16 == 0,
             "must be a multiple of 16, at least 32"),
            ("--fps", 5 <= self.fps <= 60, "must be between 5 and 60"),
            ("--min-seconds", 8.0 <= self.min_seconds <= self.max_seconds,
             "must be at least 8 and at most --max-seconds"),
            ("--max-seconds", self.max_seconds <= 3600, "must be at most 3600"),
            ("--test-fraction", 0.0 < self.test_fraction < 1.0, "must be between 0 and 1"),
        ]
        for option, ok, problem in rules:
            if not ok:  # NaN fails every comparison, so it lands here too
                value = getattr(self, option[2:].replace("-", "_"))
                raise input_error(option, f"{problem}, got {value}")

    def subset_of(self, index: int) -> str:
        num_test = max(1, min(self.videos - 1, round(self.videos * self.test_fraction)))
        return "test" if index >= self.videos - num_test else "train"
