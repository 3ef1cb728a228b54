"""Pull-workflow schedules as values, and the time arithmetic on them.

Everything here is pure: no function reads the clock, so the scheduler passes
`now` in and the tests can pin any instant, DST changes included. All
datetimes given to or returned by this module are timezone-aware; results are
in UTC. Cron expressions are parsed and evaluated by croniter, never by hand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

MIN_EVERY_S = 1
# An interval longer than a year is almost certainly a typo, and capping it keeps
# every due time far inside what datetime can represent.
MAX_EVERY_S = 365 * 86400

_UNITS_S = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
_DURATION_RE = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
_DURATION_HINT = "expected a number and a unit (s, m, h, d), e.g. 30s, 5m, 1h, 1d or 1h30m"
_CRON_FIELDS = "minute hour day-of-month month day-of-week"
_HOUR_FIELD = 1


class ScheduleError(ValueError):
    """A schedule that cannot be used; the message is meant for the operator."""


def parse_duration(text: str) -> int:
    """Return the number of seconds in an `every` duration such as `5m`.

    Accepted: one or more `<integer><unit>` parts with units `d`, `h`,
    `m`, `s` in that order, each at most once (`1h30m`, `1d12h`).
    Units are lowercase only, so `M` cannot be mistaken for months. A bare
    number is refused rather than guessed at. The total must lie between 1s
    and 365d.
    """
    cleaned = text.strip()
    if not cleaned:
        raise ScheduleError(f"empty duration: {_DURATION_HINT}")
    if cleaned.isdigit():
        raise ScheduleError(f"duration {text!r} has no unit: write {cleaned}s for seconds")
    match = _DURATION_RE.fullmatch(cleaned)
    if match is None:
        raise ScheduleError(f"invalid duration {text!r}: {_DURATION_HINT}")
    seconds = sum(
        int(count) * unit_s
        for count, (_, unit_s) in zip(match.groups(), _UNITS_S, strict=True)
        if count is not None
    )
    _check_every_range(seconds, repr(text))
    return seconds


def format_duration(seconds: int) -> str:
    """Write seconds in the form `parse_duration` reads: 5400 -> `1h30m`."""
    parts = []
    for unit, unit_s in _UNITS_S:
        count, seconds = divmod(seconds, unit_s)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts) or "0s"


def _check_every_range(seconds: int, shown: str) -> None:
    if seconds < MIN_EVERY_S:
        raise ScheduleError(f"duration {shown} is too short: the shortest interval is 1s")
    if seconds > MAX_EVERY_S:
        raise ScheduleError(f"duration {shown} is too long: the longest interval is 365d")


def _check_cron(expr: str) -> None:
    fields = expr.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"cron expression {expr!r} has {len(fields)} field(s); "
            f"exactly 5 are needed: {_CRON_FIELDS}"
        )
    try:
        # strict also refuses dates that can never happen, such as 31 February.
        croniter.expand(expr, strict=True)
    except CroniterError as exc:
        raise ScheduleError(f"invalid cron expression {expr!r}: {exc}") from None


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"unknown time zone {name!r}: use an IANA name such as Europe/Paris or UTC"
        ) from None


@dataclass(frozen=True)
class Schedule:
    """When a pull workflow runs: every N seconds, or at cron times in a zone.

    Exactly one of `every_s` and `cron` is set. `tz` only matters for
    cron and stays `UTC` for intervals. Construction validates, so a
    `Schedule` that exists is usable, whether it came from the operator or
    from storage.
    """

    every_s: int | None = None
    cron: str | None = None
    tz: str = "UTC"

    def __post_init__(self) -> None:
        if (self.every_s is None) == (self.cron is None):
            raise ScheduleError("a pull schedule needs exactly one of 'every' and 'cron'")
        if self.every_s is not None:
            if type(self.every_s) is not int:
                raise ScheduleError(f"every_s must be an int, got {self.every_s!r}")
            _check_every_range(self.every_s, f"{self.every_s}s")
            if self.tz != "UTC":
                raise ScheduleError("a time zone applies only to cron schedules, not to 'every'")
            return
        if not isinstance(self.cron, str) or not isinstance(self.tz, str):
            raise ScheduleError(f"cron and tz must be strings, got {self.cron!r}, {self.tz!r}")
        _check_cron(self.cron)
        _zone(self.tz)

    @classmethod
    def parse(cls, every: str | None, cron: str | None, tz: str | None = None) -> Schedule:
        """Build a schedule from the operator's words (`--every`/`--cron`/`--tz`)."""
        if every is not None and cron is not None:
            raise ScheduleError("give either 'every' or 'cron', not both")
        if every is not None:
            if tz is not None:
                raise ScheduleError("a time zone applies only to cron schedules, not to 'every'")
            return cls(every_s=parse_duration(every))
        if cron is None:
            raise ScheduleError("a pull schedule needs 'every' (e.g. 5m) or 'cron'")
        return cls(cron=" ".join(cron.split()), tz=tz or "UTC")

    def to_json(self) -> dict[str, Any]:
        """The stored form; `from_json` reads it back."""
        if self.every_s is not None:
            return {"every_s": self.every_s}
        return {"cron": self.cron, "tz": self.tz}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schedule:
        """Read the stored form back, refusing keys it does not know."""
        unknown = set(data) - {"every_s", "cron", "tz"}
        if unknown:
            raise ScheduleError(f"unknown schedule key(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def describe(self) -> str:
        """One line for tables: `every 5m` or `cron */5 * * * * Europe/Paris`."""
        if self.every_s is not None:
            return f"every {format_duration(self.every_s)}"
        return f"cron {self.cron} {self.tz}"


def _require_aware(name: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got naive {value!r}")
    return value.astimezone(UTC)


def next_due(schedule: Schedule, after: datetime, last_started: datetime | None = None) -> datetime:
    """Return the first instant strictly after `after` at which `schedule` is due.

    `after` is "now" for the caller: usually the due time just fired, or the
    moment the schedule was (re)set. The result is always later than it.

    `every`: HrFlow's "interval between two executions", measured from the
    start of the previous run. The run times are `anchor + k * every`
    (k >= 1), where `anchor` is `last_started` (when the previous run
    started) or, when there was none, `after`; the first of them later than
    `after` is returned. So with no previous run the answer is
    `after + every`; after a run that started at S it is `S + every`; and
    when ticks were skipped because a run was still going, the grid anchored
    at S is kept (`S + 2 * every`...) rather than restarted. Passing the due
    time rather than the actual start as `last_started` gives a grid that
    does not drift by the scheduler's latency. Intervals are elapsed time:
    `1d` is 24 hours even across a DST change (cron keeps a local time).

    `cron`: the next time matching the expression, evaluated on the wall
    clock of the schedule's zone; `last_started` is ignored. On DST changes
    wfd follows classic cron: an expression whose hour field is `*` follows
    real time, and one that names its hours runs once per local day:

    - spring forward (the clock skips, e.g. 02:00 -> 03:00): a time that does
      not exist runs at the first instant after the gap (`30 2 * * *` runs at
      03:00 that day) when the hours are named, and is skipped when the hour
      field is `*` (`30 * * * *` just runs at 01:30 and 03:30).
    - fall back (the clock repeats, e.g. 02:00-03:00 twice): a time in the
      repeated hour runs in its first pass only when the hours are named
      (`30 2 * * *` runs once), and in both passes when the hour field is
      `*` (`0 * * * *` runs every real hour).

    Raises `ValueError` on naive datetimes and `ScheduleError` if a cron
    expression has no matching time in croniter's search window (50 years).
    """
    after = _require_aware("after", after)
    if schedule.every_s is not None:
        anchor = after if last_started is None else _require_aware("last_started", last_started)
        step = timedelta(seconds=schedule.every_s)
        periods = max(1, (after - anchor) // step + 1)
        return anchor + periods * step
    return _next_cron(schedule, after)


def _next_cron(schedule: Schedule, after: datetime) -> datetime:
    assert schedule.cron is not None  # a Schedule has exactly one of every_s and cron
    matches = croniter(schedule.cron, after.astimezone(_zone(schedule.tz)))
    # croniter already runs a nonexistent named-hour time at the end of the gap
    # and skips it for every-hour expressions. It runs a repeated time twice,
    # though, so for named hours the second pass (the only one with fold=1) is
    # dropped here.
    named_hours = matches.expanded[_HOUR_FIELD] != ["*"]
    try:
        while True:
            local = matches.get_next(datetime)
            if not (named_hours and local.fold == 1):
                return local.astimezone(UTC)
    except CroniterBadDateError:
        raise ScheduleError(f"cron expression {schedule.cron!r} never matches") from None


def first_due_after_restart(
    schedule: Schedule, stored_next_due: datetime | None, now: datetime
) -> datetime:
    """The missed-fire policy: when a pull workflow first runs after the daemon starts.

    A workflow whose stored due time has passed while the daemon was down (or
    disabled, or busy) is overdue: it runs once, now, however many ticks were
    missed; its next due time is then computed from that run as usual, so it
    keeps its schedule from there. A due time still in the future is kept as
    stored. A workflow with no stored due time yet starts its schedule now.
    """
    now = _require_aware("now", now)
    if stored_next_due is None:
        return next_due(schedule, now)
    stored = _require_aware("stored_next_due", stored_next_due)
    return now if stored <= now else stored
