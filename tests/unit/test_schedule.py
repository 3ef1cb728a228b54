"""Schedules: parsing, storage round trips, and next-due times across DST changes.

Every instant in these tables is timezone-aware, and expectations are written
in UTC with the local wall time alongside, so a row can be checked by hand.
"""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from wfd.schedule import (
    Schedule,
    ScheduleError,
    first_due_after_restart,
    next_due,
    parse_duration,
)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# Europe/Paris 2025: 30 March 02:00 CET -> 03:00 CEST (01:00Z);
#                    26 October 03:00 CEST -> 02:00 CET (01:00Z).
# America/New_York 2025: 9 March 02:00 EST -> 03:00 EDT (07:00Z);
#                        2 November 02:00 EDT -> 01:00 EST (06:00Z).
CRON_TABLE = [
    # Plain cases.
    ("UTC", "*/5 * * * *", utc(2025, 1, 1, 10, 4, 59, 999999), utc(2025, 1, 1, 10, 5)),
    ("UTC", "*/5 * * * *", utc(2025, 1, 1, 10, 5), utc(2025, 1, 1, 10, 10)),  # strictly after
    ("Europe/Paris", "0 9 * * 1-5", utc(2025, 6, 13, 8), utc(2025, 6, 16, 7)),  # Fri -> Mon 09:00
    ("Asia/Kolkata", "0 9 * * *", utc(2025, 1, 1), utc(2025, 1, 1, 3, 30)),  # +05:30
    # Spring forward, named hour: 02:30 does not exist, runs at 03:00 CEST, once.
    ("Europe/Paris", "30 2 * * *", utc(2025, 3, 29, 12), utc(2025, 3, 30, 1)),
    ("Europe/Paris", "30 2 * * *", utc(2025, 3, 30, 1), utc(2025, 3, 31, 0, 30)),
    ("America/New_York", "30 2 * * *", utc(2025, 3, 8, 12), utc(2025, 3, 9, 7)),
    ("Europe/Paris", "30 1-3 * * *", utc(2025, 3, 30, 0, 30), utc(2025, 3, 30, 1)),
    ("Europe/Paris", "30 1-3 * * *", utc(2025, 3, 30, 1), utc(2025, 3, 30, 1, 30)),
    # Spring forward, every hour: the missing :30 is skipped (01:30 CET -> 03:30 CEST).
    ("Europe/Paris", "30 * * * *", utc(2025, 3, 30, 0, 30), utc(2025, 3, 30, 1, 30)),
    ("America/New_York", "15 * * * *", utc(2025, 3, 9, 6, 15), utc(2025, 3, 9, 7, 15)),
    # ...while 03:00 CEST is a real match for */30 and runs.
    ("Europe/Paris", "*/30 * * * *", utc(2025, 3, 30, 0, 30), utc(2025, 3, 30, 1)),
    # Fall back, named hour: the repeated 02:30 runs in its first pass only.
    ("Europe/Paris", "30 2 * * *", utc(2025, 10, 25, 12), utc(2025, 10, 26, 0, 30)),
    ("Europe/Paris", "30 2 * * *", utc(2025, 10, 26, 0, 30), utc(2025, 10, 27, 1, 30)),
    ("Europe/Paris", "* 2 * * *", utc(2025, 10, 26, 0, 59), utc(2025, 10, 27, 1)),
    ("America/New_York", "30 1 * * *", utc(2025, 11, 1, 12), utc(2025, 11, 2, 5, 30)),
    ("America/New_York", "30 1 * * *", utc(2025, 11, 2, 5, 30), utc(2025, 11, 3, 6, 30)),
    ("America/New_York", "0 2 * * *", utc(2025, 11, 2), utc(2025, 11, 2, 7)),  # 02:00 EST
    # Fall back, every hour: both passes run, one real hour apart.
    ("Europe/Paris", "0 * * * *", utc(2025, 10, 26, 0), utc(2025, 10, 26, 1)),
    ("America/New_York", "0 * * * *", utc(2025, 11, 2, 5), utc(2025, 11, 2, 6)),
]


@pytest.mark.parametrize(("tz", "expr", "after", "expected"), CRON_TABLE)
def test_cron_next_due(tz: str, expr: str, after: datetime, expected: datetime) -> None:
    due = next_due(Schedule.parse(None, expr, tz), after)
    assert due == expected
    assert due.tzinfo is UTC


T = utc(2025, 3, 29, 12)
MINUTE = timedelta(minutes=1)

EVERY_TABLE = [
    # (every, after, last_started, expected)
    ("5m", T, None, T + 5 * MINUTE),  # no previous run: one interval from now
    ("5m", T, T - MINUTE, T + 4 * MINUTE),  # one interval after the last start
    ("5m", T, T - 5 * MINUTE, T + 5 * MINUTE),  # due exactly now: strictly after
    ("5m", T, T - 12 * MINUTE, T + 3 * MINUTE),  # skipped ticks keep the grid
    ("5m", T, T + timedelta(seconds=1), T + timedelta(minutes=5, seconds=1)),
    ("1s", T + timedelta(milliseconds=500), T, T + timedelta(seconds=1)),
    # Intervals are real elapsed time: DST does not stretch a day.
    ("1d", T, None, utc(2025, 3, 30, 12)),
]


@pytest.mark.parametrize(("every", "after", "last_started", "expected"), EVERY_TABLE)
def test_every_next_due(
    every: str, after: datetime, last_started: datetime | None, expected: datetime
) -> None:
    assert next_due(Schedule.parse(every, None), after, last_started) == expected


def test_next_due_accepts_any_aware_zone_and_answers_in_utc() -> None:
    after = datetime(2025, 3, 29, 13, tzinfo=ZoneInfo("Europe/Paris"))
    due = next_due(Schedule.parse("1h", None), after)
    assert due == utc(2025, 3, 29, 13)
    assert due.tzinfo is UTC


@pytest.mark.parametrize(
    ("after", "last_started", "name"),
    [(datetime(2025, 1, 1), None, "after"), (T, datetime(2025, 1, 1), "last_started")],
)
def test_next_due_refuses_naive_datetimes(
    after: datetime, last_started: datetime | None, name: str
) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be a timezone-aware datetime"):
        next_due(Schedule.parse("5m", None), after, last_started)


def test_cron_that_never_matches_is_a_schedule_error() -> None:
    # The 15th of February that is also its fifth Monday: valid syntax, no date.
    schedule = Schedule.parse(None, "0 0 15 2 1#5")
    with pytest.raises(ScheduleError) as exc:
        next_due(schedule, T)
    assert str(exc.value) == "cron expression '0 0 15 2 1#5' never matches"


@pytest.mark.parametrize(
    ("stored", "now", "expected"),
    [
        (None, T, T + 5 * MINUTE),  # new workflow: start the schedule now
        (T - timedelta(days=3), T, T),  # down for days: one run now, not hundreds
        (T, T, T),  # due right now
        (T + MINUTE, T, T + MINUTE),  # not yet due: keep the stored time
    ],
)
def test_first_due_after_restart(
    stored: datetime | None, now: datetime, expected: datetime
) -> None:
    assert first_due_after_restart(Schedule.parse("5m", None), stored, now) == expected


def test_overdue_workflow_runs_once_then_keeps_its_schedule() -> None:
    schedule = Schedule.parse(None, "0 * * * *")
    now = utc(2025, 1, 2, 10, 17)
    first = first_due_after_restart(schedule, utc(2025, 1, 1, 6), now)
    assert first == now
    assert next_due(schedule, first) == utc(2025, 1, 2, 11)


def test_first_due_after_restart_refuses_naive_now() -> None:
    with pytest.raises(ValueError, match=r"^now must be a timezone-aware datetime"):
        first_due_after_restart(Schedule.parse("5m", None), None, datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("1d", 86400),
        ("90s", 90),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        (" 5m ", 300),
        ("0h1s", 1),
        ("365d", 365 * 86400),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


HINT = "expected a number and a unit (s, m, h, d), e.g. 30s, 5m, 1h, 1d or 1h30m"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f"empty duration: {HINT}"),
        ("  ", f"empty duration: {HINT}"),
        ("5", "duration '5' has no unit: write 5s for seconds"),
        ("5x", f"invalid duration '5x': {HINT}"),
        ("m5", f"invalid duration 'm5': {HINT}"),
        ("1.5h", f"invalid duration '1.5h': {HINT}"),
        ("-5m", f"invalid duration '-5m': {HINT}"),
        ("5M", f"invalid duration '5M': {HINT}"),
        ("30m1h", f"invalid duration '30m1h': {HINT}"),
        ("1h1h", f"invalid duration '1h1h': {HINT}"),
        ("1h 30m", f"invalid duration '1h 30m': {HINT}"),
        ("0s", "duration '0s' is too short: the shortest interval is 1s"),
        ("0h0m", "duration '0h0m' is too short: the shortest interval is 1s"),
        ("366d", "duration '366d' is too long: the longest interval is 365d"),
    ],
)
def test_parse_duration_errors(text: str, message: str) -> None:
    with pytest.raises(ScheduleError) as exc:
        parse_duration(text)
    assert str(exc.value) == message


FIELDS = "exactly 5 are needed: minute hour day-of-month month day-of-week"


@pytest.mark.parametrize(
    ("every", "cron", "tz", "message"),
    [
        ("5m", "* * * * *", None, "give either 'every' or 'cron', not both"),
        (None, None, None, "a pull schedule needs 'every' (e.g. 5m) or 'cron'"),
        (None, None, "UTC", "a pull schedule needs 'every' (e.g. 5m) or 'cron'"),
        ("5m", None, "Europe/Paris", "a time zone applies only to cron schedules, not to 'every'"),
        ("5", None, None, "duration '5' has no unit: write 5s for seconds"),
        (None, "* * * *", None, f"cron expression '* * * *' has 4 field(s); {FIELDS}"),
        (None, "0 * * * * *", None, f"cron expression '0 * * * * *' has 6 field(s); {FIELDS}"),
        (None, "@daily", None, f"cron expression '@daily' has 1 field(s); {FIELDS}"),
        (None, "", None, f"cron expression '' has 0 field(s); {FIELDS}"),
        (
            None,
            "61 * * * *",
            None,
            "invalid cron expression '61 * * * *': [61 * * * *] is not acceptable, out of range",
        ),
        (
            None,
            "*/0 * * * *",
            None,
            "invalid cron expression '*/0 * * * *': "
            "[*/0 * * * *] step '0' in field 0 is not acceptable",
        ),
        (
            None,
            "0 0 31 2 *",
            None,
            "invalid cron expression '0 0 31 2 *': "
            "[0 0 31 2 *] is not acceptable. Day(s) [31] can never occur in month(s) [2]",
        ),
        (
            None,
            "0 0 * * mon#6",
            None,
            "invalid cron expression '0 0 * * mon#6': "
            "[0 0 * * mon#6] is not acceptable. Invalid day_of_week value: '6'",
        ),
        (
            None,
            "* * * * *",
            "Mars/Olympus",
            "unknown time zone 'Mars/Olympus': use an IANA name such as Europe/Paris or UTC",
        ),
        (
            None,
            "* * * * *",
            "../../etc/passwd",
            "unknown time zone '../../etc/passwd': use an IANA name such as Europe/Paris or UTC",
        ),
    ],
)
def test_schedule_parse_errors(
    every: str | None, cron: str | None, tz: str | None, message: str
) -> None:
    with pytest.raises(ScheduleError) as exc:
        Schedule.parse(every, cron, tz)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("every", "cron", "tz", "described", "stored"),
    [
        ("5m", None, None, "every 5m", {"every_s": 300}),
        ("90m", None, None, "every 1h30m", {"every_s": 5400}),
        ("1d", None, None, "every 1d", {"every_s": 86400}),
        (None, " */5  * * * * ", "Europe/Paris", "cron */5 * * * * Europe/Paris",
         {"cron": "*/5 * * * *", "tz": "Europe/Paris"}),
        (None, "0 9 * * 1-5", None, "cron 0 9 * * 1-5 UTC", {"cron": "0 9 * * 1-5", "tz": "UTC"}),
    ],
)  # fmt: skip
def test_describe_and_storage_round_trip(
    every: str | None, cron: str | None, tz: str | None, described: str, stored: dict
) -> None:
    schedule = Schedule.parse(every, cron, tz)
    assert schedule.describe() == described
    assert schedule.to_json() == stored
    assert Schedule.from_json(stored) == schedule


ONE_OF = "a pull schedule needs exactly one of 'every' and 'cron'"


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ({"every_s": 300, "jitter": 5}, "unknown schedule key(s): jitter"),
        ({"every_s": "300"}, "every_s must be an int, got '300'"),
        ({"every_s": True}, "every_s must be an int, got True"),
        ({"every_s": 0}, "duration 0s is too short: the shortest interval is 1s"),
        ({"cron": 5, "tz": "UTC"}, "cron and tz must be strings, got 5, 'UTC'"),
        ({}, ONE_OF),
        ({"every_s": 5, "cron": "* * * * *"}, ONE_OF),
    ],
)  # fmt: skip
def test_from_json_refuses_bad_stored_data(stored: dict, message: str) -> None:
    with pytest.raises(ScheduleError) as exc:
        Schedule.from_json(stored)
    assert str(exc.value) == message
