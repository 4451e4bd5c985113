"""tIoU threshold lists: ``0.3,0.5``, ``start:stop:step`` and the dataset presets."""
import numpy as np

from losa_tal import ConfigError

# Ranges are built like the field builds them (numpy.linspace over the inclusive range), so
# thresholds such as 0.8999999999999999 come out bit for bit the same as in ActionFormer/OpenTAD.
DATASET_RANGES = {"thumos": "0.3:0.7:0.1", "anet": "0.5:0.95:0.05"}
DEFAULT_DATASET = "thumos"


def parse_tiou(spec: str | None = None, dataset: str | None = None) -> list:
    """Thresholds from ``spec`` or a ``dataset`` preset (default: the THUMOS-14 range).

    ``spec`` is a comma list of floats, parsed exactly, or an inclusive ``start:stop:step`` range.
    A bad one is a ConfigError about ``tiou`` (or ``dataset``).
    """
    if spec is not None and dataset is not None:
        raise ConfigError("tiou", "give either `tiou` or `dataset`, not both")
    if spec is None:
        dataset = DEFAULT_DATASET if dataset is None else dataset.lower()
        if dataset not in DATASET_RANGES:
            raise ConfigError("dataset", f"unknown dataset '{dataset}' "
                              f"(known: {', '.join(DATASET_RANGES)})")
        spec = DATASET_RANGES[dataset]
    thresholds = _parse_range(spec) if ":" in spec else _parse_list(spec)
    for value in thresholds:
        if not 0.0 < value <= 1.0:
            raise ConfigError("tiou", f"threshold {value!r} is outside (0, 1]")
    return thresholds


def _parse_list(spec: str) -> list:
    try:
        values = [float(part) for part in spec.split(",")]
    except ValueError:
        raise ConfigError("tiou", f"'{spec}' is not a comma list of numbers") from None
    if not values or not np.all(np.isfinite(values)):
        raise ConfigError("tiou", f"'{spec}' is not a comma list of numbers")
    return values


def _parse_range(spec: str) -> list:
    parts = spec.split(":")
    try:
        start, stop, step = (float(part) for part in parts)
    except ValueError:
        raise ConfigError("tiou", f"'{spec}' is not start:stop:step") from None
    if not (np.isfinite([start, stop, step]).all() and step > 0 and stop >= start):
        raise ConfigError("tiou", f"'{spec}' needs a positive step and stop >= start")
    intervals = (stop - start) / step
    count = int(round(intervals)) + 1
    if abs(intervals - (count - 1)) > 1e-6:
        raise ConfigError("tiou", f"'{spec}': the step does not divide stop - start")
    return np.linspace(start, stop, count).tolist()
