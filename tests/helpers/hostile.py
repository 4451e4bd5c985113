"""What the hostile-input campaigns share: hypothesis settings for a fixed number of generated
examples, and a pickled object that would run code if anything unpickled it."""
from hypothesis import HealthCheck, settings


def fuzz(examples: int):
    """Hypothesis settings: a fixed number of examples, no deadline (the first call imports)."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


class CodeExecution:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
