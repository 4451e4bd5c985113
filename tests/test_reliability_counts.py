"""Counts the reliability campaign's cases per category (docs/reliability.md quotes its output).

Not a test module: run ``.venv/bin/python tests/test_reliability_counts.py``. It collects the
suite with pytest (nothing runs) and counts, per category, each collected case once, a
hypothesis test as its ``max_examples``, and a test that loops over a table of cases itself
(it sets ``reliability_cases``) as that many. Which tests belong to which category is the table
below: whole files for the campaign's own files, test-name prefixes for scenarios that live in
the packages' own test files.
"""
import collections
import re
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parent
CATEGORIES = [  # (category, file, test-name regex); the first match wins
    ("crashes", "test_store_faults.py", r"test_(sigkill|hdf5_writer_killed|hdf5_append_killed|"
                                        r"journal_roll_back)"),
    ("crashes", "test_training.py", r"test_sigkill"),
    ("crashes", "test_reliability_processes.py", r""),
    ("crashes", "test_extract_faults.py", r"test_(sigkill|killed)"),
    ("crashes", "test_reliability_stores.py", r"test_a_killed_command"),
    ("disk full and permissions", "test_reliability_storage.py", r""),
    ("disk full and permissions", "test_store_faults.py", r"test_(zarr_write_failure|"
                                                          r"zarr_publish_failure|"
                                                          r"hdf5_write_failure|read_only)"),
    ("disk full and permissions", "test_evaluation_cli.py", r"test_(outputs_that_cannot|"
                                                            r"existing_report_survives)"),
    ("disk full and permissions", "test_extract_faults.py", r"test_disk_full"),
    ("concurrency", "test_reliability_concurrency.py", r""),
    ("concurrency", "test_store_cluster.py", r""),
    ("stores over URLs", "test_reliability_urls.py", r""),
    ("concurrency", "test_extract_faults.py", r"test_(three_extractors|two_workers|"
                                              r"a_video_claimed)"),
    ("concurrency", "test_store_faults.py", r"test_(three_writers|racing_writers|"
                                            r"a_live_writers)"),
    ("concurrency", "test_store.py", r"test_claims_are_exclusive"),
    ("concurrency", "test_reliability_outputs.py", r"test_two_"),
    ("concurrency", "test_reliability_stores.py", r"test_looping_reads_at_once"),
    ("hostile inputs", "test_reliability_inputs.py", r""),
    ("hostile inputs", "test_reliability_checkpoints.py", r""),
    ("hostile inputs", "test_reliability_stores.py", r""),
    ("hostile inputs", "test_reliability_configs.py", r""),
    ("hostile inputs", "test_reliability_annotations.py", r""),
    ("hostile inputs", "test_reliability_names.py", r""),
    ("hostile inputs", "test_reliability_outputs.py", r""),
    ("hostile inputs", "test_store.py", r"test_(opening_what_is_not|malformed_root_metadata|"
                                        r"metadata_that_lies|video_records_and_times_that_lie|"
                                        r"damaged_bytes|hostile_video_ids|encoded_ids|"
                                        r"bad_writes|non_finite_features|verify_names_damage)"),
    ("hostile inputs", "test_store_cli.py", r"test_(import_refuses_bad|bad_command_lines)"),
    ("hostile inputs", "test_backbone.py", r"test_(mismatched_checkpoints|pickled_objects|"
                                           r"files_that_are_not_checkpoints|bad_configs)"),
    ("hostile inputs", "test_evaluation_cli.py", r"test_(bad_input_file|bad_options|"
                                                 r"missing_file)"),
    ("hostile inputs", "test_config.py", r"test_(bad_keys|unreadable_files|bad_overrides)"),
    ("hostile inputs", "test_training.py", r"test_(wrong_checkpoints|missing_store|"
                                           r"store_lacking)"),
    ("hostile inputs", "test_extract_faults.py", r"test_(a_hostile_video|a_video_decoding|"
                                                 r"all_hostile)"),
    ("hostile inputs", "test_extract_pipeline.py", r"test_(cli_bad_options|append_with_another|"
                                                   r"cli_with_workers_skips)"),
    ("determinism", "test_reliability_determinism.py", r""),
    ("determinism", "test_extract_faults.py", r"test_torchrun"),
    ("determinism", "test_extract_pipeline.py", r"test_(hdf5_store_holds|cli_with_workers)"),
    ("determinism", "test_training.py", r"test_(same_seed|two_processes)"),
]


class Counter:
    """A pytest plugin that tallies collected items into CATEGORIES."""

    def __init__(self):
        self.cases = collections.Counter()  # by (category, file)
        self.tests = collections.Counter()

    def pytest_collection_modifyitems(self, items):
        for item in items:
            file, _, name = item.nodeid.partition("::")
            category = next((c for c, f, pattern in CATEGORIES
                             if Path(file).name == f and re.match(pattern, name)), None)
            if category is not None:
                self.tests[category, Path(file).name] += 1
                self.cases[category, Path(file).name] += cases_of(item.function)


def cases_of(function) -> int:
    if getattr(function, "is_hypothesis_test", False):
        return function._hypothesis_internal_use_settings.max_examples
    return getattr(function, "reliability_cases", 1)


def main():
    import pytest

    counter = Counter()
    files = sorted({str(TESTS_DIR / f) for _, f, _ in CATEGORIES if (TESTS_DIR / f).exists()})
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *files],
                       plugins=[counter])
    print(f"\n{'category / file':45} {'tests':>6} {'cases':>7}")
    for category in dict.fromkeys(c for c, _, _ in CATEGORIES):
        files = [f for c, f in counter.tests if c == category]
        print(f"{category:45} {sum(counter.tests[category, f] for f in files):>6} "
              f"{sum(counter.cases[category, f] for f in files):>7}")
        for f in files:
            print(f"  {f:43} {counter.tests[category, f]:>6} {counter.cases[category, f]:>7}")
    return code


if __name__ == "__main__":
    sys.path[:0] = [str(TESTS_DIR), str(TESTS_DIR.parent)]
    sys.exit(main())
