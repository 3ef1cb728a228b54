"""The retry backoff of async deliveries as a pure function: full jitter, doubling, an hour cap."""

import random

import pytest

from wfd.delivery import MAX_BACKOFF_S, retry_delay


class Highest(random.Random):
    """Always the top of the range asked for: shows the ceiling of each attempt."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("failures, ceiling", [
    (1, 10), (2, 20), (3, 40), (4, 80), (9, 2560), (10, 3600), (60, 3600), (500, 3600)])
def test_the_ceiling_doubles_from_the_base_and_stops_at_an_hour(failures, ceiling):
    assert retry_delay(failures, 10, Highest()) == ceiling
    assert MAX_BACKOFF_S == 3600


def test_delays_spread_over_the_whole_range():
    rng = random.Random(1)
    delays = [retry_delay(3, 10, rng) for _ in range(2000)]
    assert 0 <= min(delays) < 1 and 39 < max(delays) <= 40
    assert 18 < sum(delays) / len(delays) < 22  # uniform: the mean is half the ceiling
