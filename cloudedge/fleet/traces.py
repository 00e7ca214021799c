"""When devices are online and how fast each one is: availability models and speed models.

Availability (docs/profiles.md, "Availability and speed traces"):

- :class:`BernoulliAvailability` (the default): one draw per device and round against its profile's
  ``availability``; no notion of time.
- :class:`IntervalTrace`: online intervals ``device, start_s, end_s`` in virtual time, read from a
  CSV or JSONL file (:func:`load_interval_trace`). A row may name a device id or a profile (then the
  intervals apply to every device of that profile that has no rows of its own); a device named by
  neither is never online. ``repeat_s`` repeats the trace with that period (FedScale's traces are
  periodic).
- :class:`DiurnalAvailability`: the bundled generator. The chance that a device is online follows
  its local hour (a cosine between ``low`` and ``high`` peaking at ``peak_hour``), devices spread
  over time zones, and sessions have heavy-tailed (log-normal) lengths. Nothing is stored per
  device: whether device ``d`` starts a session in hour-window ``w`` and how long it lasts are
  hashes of ``(seed, d, w)``, so asking about a million devices costs only the devices asked about.

With a time-based model a device that goes offline while it trains is a dropout at that instant.

Speed (:class:`SpeedModel`): per-device multipliers of the profile's compute and link rates, from a
log-normal with median 1 (hashed from ``(seed, device number)``) or from a CSV file
``device, compute_scale, uplink_scale, downlink_scale``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cloudedge.errors import InputError

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_KEYS = (np.uint64(0xD6E8FEB86659FD93), np.uint64(0xA0761D6478BD642F), np.uint64(0xE7037ED1A0B428DB),
         np.uint64(0x8EBC6AF09C88C6E3))
_TWO53 = float(2**53)


def hash_uniform(seed: int, *keys: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) numbers, one per element of the broadcast ``keys``: a pure function of
    ``(seed, *keys)`` (splitmix64 finalizer over a mix of the keys), the same in every process."""
    arrays = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    with np.errstate(over="ignore"):
        x = np.full(arrays[0].shape, np.uint64(seed % 2**64), dtype=np.uint64) * _M1
        for i, a in enumerate(arrays):
            x = (x ^ (a.astype(np.uint64) * _KEYS[i % len(_KEYS)])) * _M1
            x ^= x >> np.uint64(31)
        x = (x ^ (x >> np.uint64(30))) * _M2
        x = (x ^ (x >> np.uint64(27))) * _M3
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) / _TWO53


def _normal(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normal numbers from two uniforms (Box-Muller)."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


class BernoulliAvailability:
    """One draw per device and round against its profile's availability (no time)."""

    kind = "bernoulli"
    timed = False

    def online_mask(self, availability: np.ndarray, t: float, rng: np.random.Generator) -> np.ndarray:
        """Which of the devices (their profiles' availabilities) are reachable: one draw each, in order."""
        return rng.random(len(availability)) < availability


@dataclass
class DiurnalAvailability:
    """Online probability following the local hour; heavy-tailed sessions (see the module docstring).

    Device ``d`` starts a session in UTC window ``w`` (``window_s`` long) with chance
    ``q(h) = min(1, p(h) * window_s / E[session])``, ``h`` the local hour at the window's start and
    ``p(h) = low + (high - low) * (1 + cos(2 pi (h - peak_hour) / 24)) / 2``; the session starts at a
    uniform time in the window and lasts ``min(max_session_s, LogNormal(ln median_session_s, sigma))``.
    Its time zone is drawn once from ``timezones`` (UTC offset in hours -> weight).
    """

    seed: int = 0
    low: float = 0.05
    high: float = 0.30
    peak_hour: float = 2.0
    median_session_s: float = 1200.0
    sigma: float = 1.0
    max_session_s: float = 4 * 3600.0
    window_s: float = 3600.0
    timezones: dict[float, float] | None = None

    kind = "diurnal"
    timed = True

    def __post_init__(self) -> None:
        zones = self.timezones or {float(h): 1.0 for h in range(-8, 10)}  # UTC-8 .. UTC+9, even (assumption)
        self._offsets = np.array(list(zones), dtype=np.float64)
        w = np.array(list(zones.values()), dtype=np.float64)
        self._zone_cdf = np.cumsum(w / w.sum())
        # E[min(L, cap)] of the log-normal, from its quantiles (deterministic, no sampling).
        q = (np.arange(20_000) + 0.5) / 20_000
        from scipy.special import ndtri

        lengths = np.minimum(self.median_session_s * np.exp(self.sigma * ndtri(q)), self.max_session_s)
        self._mean_session = float(lengths.mean())
        self._lookback = int(math.ceil(self.max_session_s / self.window_s))

    def offset_hours(self, numbers: np.ndarray) -> np.ndarray:
        u = hash_uniform(self.seed, numbers, -1, 0)
        return self._offsets[np.minimum(np.searchsorted(self._zone_cdf, u, side="right"), len(self._offsets) - 1)]

    def p_online(self, local_hour: np.ndarray | float) -> np.ndarray:
        """The target chance of being online at a local hour."""
        h = np.asarray(local_hour, dtype=np.float64)
        return self.low + (self.high - self.low) * 0.5 * (1.0 + np.cos(2.0 * math.pi * (h - self.peak_hour) / 24.0))

    def _sessions(self, numbers: np.ndarray, windows: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) of the session each device starts in each window (NaN: none)."""
        hour = np.mod(windows * self.window_s / 3600.0 + offsets, 24.0)
        q = np.minimum(1.0, self.p_online(hour) * self.window_s / self._mean_session)
        starts_one = hash_uniform(self.seed, numbers, windows, 1) < q
        start = (windows + hash_uniform(self.seed, numbers, windows, 2)) * self.window_s
        z = _normal(hash_uniform(self.seed, numbers, windows, 3), hash_uniform(self.seed, numbers, windows, 4))
        length = np.minimum(self.median_session_s * np.exp(self.sigma * z), self.max_session_s)
        return np.where(starts_one, start, np.nan), np.where(starts_one, start + length, np.nan)

    def online(self, numbers: np.ndarray, t: float) -> np.ndarray:
        """Whether each device (by number) is online at time ``t``."""
        numbers = np.asarray(numbers, dtype=np.int64)
        offsets = self.offset_hours(numbers)
        w_now = math.floor(t / self.window_s)
        out = np.zeros(len(numbers), dtype=bool)
        for k in range(self._lookback + 1):
            start, end = self._sessions(numbers, np.full(len(numbers), w_now - k, dtype=np.int64), offsets)
            out |= (start <= t) & (t < end)
        return out

    def online_until(self, number: int, t: float) -> float:
        """When the session holding device ``number`` at ``t`` ends (overlapping sessions joined);
        ``t`` itself when it is offline."""
        nums = np.array([number], dtype=np.int64)
        offsets = self.offset_hours(nums)
        first = math.floor(t / self.window_s) - self._lookback
        end, span = t, 2 * self._lookback + 2
        while True:
            # The sessions of a block of windows at once (one hash call per stream, not per window).
            windows = np.arange(first, first + span, dtype=np.int64)
            starts, ends = self._sessions(np.repeat(nums, span), windows, np.repeat(offsets, span))
            for s0, e0 in zip(starts.tolist(), ends.tolist(), strict=True):
                if s0 == s0 and s0 <= end < e0:  # s0 == s0: not NaN (a session starts in that window)
                    end = e0
            first += span
            if first * self.window_s > end:
                return end


@dataclass
class IntervalTrace:
    """Online intervals per device number (and per profile name), from a file; see the module docstring.

    ``device_rows``: device number -> sorted non-overlapping (start, end) arrays; ``profile_rows``:
    profile name -> the same. ``repeat_s``: the trace repeats with this period (None: it does not).
    """

    device_rows: dict[int, tuple[np.ndarray, np.ndarray]]
    profile_rows: dict[str, tuple[np.ndarray, np.ndarray]]
    repeat_s: float | None = None
    source: str = "trace"

    kind = "trace"
    timed = True

    def intervals_of(self, number: int, profile_name: str) -> tuple[np.ndarray, np.ndarray] | None:
        got = self.device_rows.get(int(number))
        return got if got is not None else self.profile_rows.get(profile_name)

    def _local(self, t: float) -> tuple[float, float]:
        if self.repeat_s is None:
            return t, 0.0
        base = math.floor(t / self.repeat_s) * self.repeat_s
        return t - base, base

    def online_one(self, number: int, profile_name: str, t: float) -> bool:
        iv = self.intervals_of(number, profile_name)
        if iv is None:
            return False
        tl, _ = self._local(t)
        i = int(np.searchsorted(iv[0], tl, side="right")) - 1
        return i >= 0 and tl < iv[1][i]

    def online_until(self, number: int, profile_name: str, t: float) -> float:
        iv = self.intervals_of(number, profile_name)
        if iv is None:
            return t
        tl, base = self._local(t)
        i = int(np.searchsorted(iv[0], tl, side="right")) - 1
        if i < 0 or tl >= iv[1][i]:
            return t
        end = base + float(iv[1][i])
        # A session running into the next period continues when the trace starts online.
        if self.repeat_s is not None and iv[1][i] >= self.repeat_s and iv[0][0] <= 0.0:
            end = base + self.repeat_s + float(iv[1][0])
        return end


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV (with a header) or JSONL file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"{path}: cannot read the trace ({err.strerror})") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        from cloudedge.data.userdata import jsonl_objects

        yield from jsonl_objects(text.splitlines(), path)
        return
    reader = csv.DictReader(text.splitlines())
    for row in reader:
        yield reader.line_num, {k.strip(): v for k, v in row.items() if k is not None}


def _number(path: Path, no: int, row: dict[str, Any], field: str) -> float:
    if field not in row or row[field] in (None, ""):
        raise InputError(f"{path}:{no}: missing '{field}'")
    try:
        value = float(row[field])
    except (TypeError, ValueError):
        raise InputError(f"{path}:{no}: '{field}' is not a number: {row[field]!r}") from None
    if not math.isfinite(value):
        raise InputError(f"{path}:{no}: '{field}' must be finite, got {row[field]!r}")
    return value


def load_interval_trace(path: str | Path, device_number: Callable[[str], int | None], profile_names: set[str],
                        repeat_s: float | None = None) -> IntervalTrace:
    """Read ``device, start_s, end_s`` rows (CSV with that header, or JSONL objects).

    ``device_number(id)`` gives a device id's number in the fleet (None: no such device). A row
    naming neither a device nor one of ``profile_names``, a negative or reversed interval, an
    interval past ``repeat_s``, and overlapping intervals of one device are ``InputError``s naming
    the file and line."""
    path = Path(path)
    collected: dict[object, list[tuple[float, float, int]]] = {}
    names: dict[object, str] = {}
    for no, row in _rows(path):
        name = row.get("device")
        if name in (None, ""):
            raise InputError(f"{path}:{no}: missing 'device'")
        name = str(name).strip()
        start, end = _number(path, no, row, "start_s"), _number(path, no, row, "end_s")
        if start < 0 or end < 0:
            raise InputError(f"{path}:{no}: negative time ({start:g}, {end:g}); times are virtual seconds from 0")
        if end <= start:
            raise InputError(f"{path}:{no}: end_s {end:g} is not after start_s {start:g}")
        if repeat_s is not None and end > repeat_s:
            raise InputError(f"{path}:{no}: end_s {end:g} is past the trace's period repeat_s {repeat_s:g}")
        number = device_number(name)
        key: object
        if number is not None:
            key = number
        elif name in profile_names:
            key = f"profile:{name}"
        else:
            raise InputError(f"{path}:{no}: unknown device {name!r} (neither a device id of this fleet, "
                             "e.g. 'edge0/dev0', nor a profile name)")
        collected.setdefault(key, []).append((start, end, no))
        names[key] = name
    device_rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    profile_rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, items in collected.items():
        items.sort()
        for (s0, e0, no0), (s1, _, no1) in zip(items, items[1:], strict=False):
            if s1 < e0:
                raise InputError(f"{path}:{no1}: interval starting at {s1:g} overlaps line {no0} "
                                 f"({s0:g}..{e0:g}) of {names[key]!r}")
        arrays = (np.array([s for s, _, _ in items]), np.array([e for _, e, _ in items]))
        if isinstance(key, str):
            profile_rows[key[len("profile:"):]] = arrays
        else:
            device_rows[int(key)] = arrays  # type: ignore[call-overload]
    return IntervalTrace(device_rows, profile_rows, repeat_s, str(path))


@dataclass
class SpeedModel:
    """Per-device multipliers of compute and link rates (see the module docstring).

    ``kind`` "lognormal": ``exp(sigma z)``, z standard normal hashed from ``(seed, device number)``
    (median 1: the median device is its profile); "file": rows per device number (devices not in
    the file keep their profile's figures)."""

    kind: str = "lognormal"
    compute_sigma: float = 0.5
    link_sigma: float = 0.5
    seed: int = 0
    table: dict[int, tuple[float, float, float]] | None = None

    def scales(self, number: int) -> tuple[float, float, float]:
        """(compute, uplink, downlink) multipliers of device ``number``."""
        if self.kind == "file":
            return (self.table or {}).get(int(number), (1.0, 1.0, 1.0))
        n = np.array([number], dtype=np.int64)
        zc = _normal(hash_uniform(self.seed, n, 11), hash_uniform(self.seed, n, 12))[0]
        zl = _normal(hash_uniform(self.seed, n, 13), hash_uniform(self.seed, n, 14))[0]
        link = math.exp(self.link_sigma * zl)
        return math.exp(self.compute_sigma * zc), link, link


def load_speed_table(path: str | Path, device_number: Callable[[str], int | None]) -> dict[int, tuple[float, float, float]]:
    """Read ``device, compute_scale, uplink_scale, downlink_scale`` rows (CSV or JSONL)."""
    path = Path(path)
    table: dict[int, tuple[float, float, float]] = {}
    seen: dict[int, int] = {}
    for no, row in _rows(path):
        name = str(row.get("device", "")).strip()
        number = device_number(name) if name else None
        if number is None:
            raise InputError(f"{path}:{no}: unknown device {name!r} (not a device id of this fleet)")
        if number in seen:
            raise InputError(f"{path}:{no}: device {name!r} already given on line {seen[number]}")
        scales = tuple(_number(path, no, row, f) for f in ("compute_scale", "uplink_scale", "downlink_scale"))
        if any(s <= 0 for s in scales):
            raise InputError(f"{path}:{no}: scales must be > 0, got {scales}")
        seen[number] = no
        table[number] = scales  # type: ignore[assignment]
    return table


def build_models(cfg: Any, fleet: Any, seed: int) -> tuple[Any, SpeedModel | None]:
    """The availability model and speed model a `FleetConfig` asks for, over ``fleet``."""
    spec = cfg.availability
    if spec.kind == "trace":
        names = {p.name for p, _, _ in fleet.device_profile_set()}
        availability: Any = load_interval_trace(spec.path, fleet.device_number, names, spec.repeat_s)
    elif spec.kind == "diurnal":
        availability = DiurnalAvailability(
            seed=seed, low=spec.low, high=spec.high, peak_hour=spec.peak_hour, median_session_s=spec.median_session_s,
            sigma=spec.sigma, max_session_s=spec.max_session_s, window_s=3600.0, timezones=spec.timezones)
    else:
        availability = BernoulliAvailability()
    speed = None
    if cfg.speed is not None:
        s = cfg.speed
        table = load_speed_table(s.path, fleet.device_number) if s.kind == "file" else None
        speed = SpeedModel(s.kind, s.compute_sigma, s.link_sigma, seed, table)
    return availability, speed


# --- the fleet's availability, whatever its model ---------------------------------------------------

def online_mask(fleet: Any, numbers: np.ndarray, t: float, rng: np.random.Generator) -> np.ndarray:
    """Which devices (by number) are online at ``t``. Bernoulli: one draw each from ``rng``, in order
    (the draws `cloudedge.fleet.available_nodes` makes); traces and diurnal: the model at ``t``."""
    model = fleet.availability
    numbers = np.asarray(numbers, dtype=np.int64)
    if model.kind == "bernoulli":
        avail = np.array([p.availability for p in fleet.base_profiles(numbers)], dtype=np.float64)
        return model.online_mask(avail, t, rng)
    if model.kind == "diurnal":
        return model.online(numbers, t)
    return np.array([model.online_one(int(n), fleet.base_profile(int(n)).name, t) for n in numbers], dtype=bool)


def online_until(fleet: Any, number: int, t: float) -> float:
    """When device ``number``, online at ``t``, goes offline (inf: the model has no time)."""
    model = fleet.availability
    if model.kind == "bernoulli":
        return math.inf
    if model.kind == "diurnal":
        return model.online_until(number, t)
    return model.online_until(number, fleet.base_profile(number).name, t)


def sample_online(fleet: Any, lo: int, hi: int, t: float, want: int, rng: np.random.Generator,
                  numbers: np.ndarray | None = None) -> np.ndarray:
    """Up to ``want`` devices drawn uniformly among those numbered ``lo .. hi-1`` (or among
    ``numbers``, when given) that are online at ``t``, without looking at the others: candidates are
    drawn at random and checked, in growing batches, until ``want`` are online or every device was
    checked. Sorted device numbers."""
    pool = hi - lo if numbers is None else len(numbers)
    if pool <= 0 or want <= 0:
        return np.zeros(0, dtype=np.int64)
    m = min(pool, 4 * want)
    while True:
        picked = rng.choice(pool, size=m, replace=False)
        cand = lo + picked if numbers is None else np.asarray(numbers, dtype=np.int64)[picked]
        online = cand[online_mask(fleet, cand, t, rng)]
        if len(online) >= want or m == pool:
            return np.sort(online[:want])
        m = min(pool, m * 4)


ONLINE_SAMPLE = 10_000  # devices checked to report the online count of a larger fleet


def online_count(fleet: Any, t: float) -> float:
    """Devices online at ``t``: exact up to ``ONLINE_SAMPLE`` devices, else estimated from that many
    evenly spaced ones. Bernoulli: the expected number (its draws have no time)."""
    n = len(fleet.devices)
    if n == 0:
        return 0.0
    numbers = np.unique(np.linspace(0, n - 1, min(n, ONLINE_SAMPLE)).astype(np.int64))
    if fleet.availability.kind == "bernoulli":
        share = float(np.mean([p.availability for p in fleet.base_profiles(numbers)]))
    else:
        share = float(online_mask(fleet, numbers, t, np.random.default_rng(0)).mean())
    return round(share * n, 2)
