"""Budgets: how much of the pool a user, or a group of users, may take.

Three kinds, each optional, per user (or a default for every user) and per group:

- ``gpus``: GPUs held or waited for at once (a request past it is refused, nothing running ends);
- ``gpu_hours_per_day``: GPU-hours per UTC day (resets at 00:00 UTC);
- ``money_per_month``: what the GPUs cost per calendar month, UTC (each lease at its type's
  price per GPU-hour when it was granted, as metering bills it).

Sans-I/O, like the core that drives it: the core reports requests, grants and ends with their
wall-clock times, asks :meth:`BudgetPolicy.refusal` before it queues a request, and at
:meth:`BudgetPolicy.next_due` calls :meth:`BudgetPolicy.due`, which names the running leases to
warn (90% of a budget) and to end (100%). CPU kernels (type ``cpu``) are no GPUs: they count
only for money, at their price (0 unless configured). Group budgets count every member's leases
together; a lease counts for the groups its user was in when it was requested (the identity's
groups, e.g. JupyterHub's) and for the groups the budget config lists the user in.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from jupyter_gpu.protocol import CPU_TYPE, GpuChoice

GPUS = "gpus"
GPU_HOURS_PER_DAY = "gpu_hours_per_day"
MONEY_PER_MONTH = "money_per_month"
LIMIT_NAMES = (GPUS, GPU_HOURS_PER_DAY, MONEY_PER_MONTH)
#: Share of a budget at which running leases are warned.
WARN_AT = 0.9
_DAY = 86400.0


@dataclass(frozen=True)
class Limits:
    """One user's or group's budget; None: no limit of that kind."""

    gpus: int | None = None
    gpu_hours_per_day: float | None = None
    money_per_month: float | None = None

    @classmethod
    def parse(cls, where: str, value: Any) -> Limits:
        """From a config entry such as ``{"gpus": 2, "gpu_hours_per_day": 8}``; ValueError naming what is wrong."""
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a dict such as {{'gpus': 2, 'gpu_hours_per_day': 8}}, got {value!r}")
        unknown = sorted(set(value) - set(LIMIT_NAMES) - {"members"})
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}: use "
                             f"{', '.join(LIMIT_NAMES)} (and 'members' for a group)")
        numbers: dict[str, float | None] = {}
        for name in LIMIT_NAMES:
            number = value.get(name)
            ok = number is None or (isinstance(number, int | float) and not isinstance(number, bool)
                                    and math.isfinite(number) and number >= 0)
            if not ok or (name == GPUS and number is not None and number != int(number)):
                kind = "a whole number of GPUs" if name == GPUS else "a number >= 0"
                raise ValueError(f"{where}[{name!r}] must be {kind} (or None for no limit), got {number!r}")
            numbers[name] = number
        gpus = numbers[GPUS]
        return cls(None if gpus is None else int(gpus), numbers[GPU_HOURS_PER_DAY], numbers[MONEY_PER_MONTH])


@dataclass(frozen=True)
class BudgetConfig:
    """The operator's budgets: per user (``default`` for users not listed) and per group."""

    users: Mapping[str, Limits] = field(default_factory=dict)
    default: Limits = Limits()
    groups: Mapping[str, Limits] = field(default_factory=dict)
    #: group -> users the config itself puts in it (for identities without groups, e.g. tokens)
    members: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, users: Mapping[str, Any], groups: Mapping[str, Any], default: Any) -> BudgetConfig:
        parsed_groups = {}
        members = {}
        for name, value in groups.items():
            where = f"Budgets.groups[{name!r}]"
            parsed_groups[str(name)] = Limits.parse(where, value)
            listed = value.get("members", [])
            if not isinstance(listed, list | tuple) or not all(isinstance(m, str) for m in listed):
                raise ValueError(f"{where}['members'] must be a list of user names, got {listed!r}")
            members[str(name)] = frozenset(listed)
        for name, value in users.items():
            if isinstance(value, Mapping) and "members" in value:
                raise ValueError(f"Budgets.users[{name!r}] has 'members': only a group has members")
        return cls(
            users={str(name): Limits.parse(f"Budgets.users[{name!r}]", value) for name, value in users.items()},
            default=Limits.parse("Budgets.default", default),
            groups=parsed_groups,
            members=members,
        )

    @property
    def empty(self) -> bool:
        return not self.users and not self.groups and self.default == Limits()


@dataclass(frozen=True)
class Scope:
    """Whose budget: ``user alice`` or ``group physics``."""

    kind: str  # "user" or "group"
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass
class _Entry:
    """One active lease as budgets count it: waited for (``start`` None) or held from ``start``."""

    lease_id: str
    user: str
    groups: frozenset[str]
    count: int
    #: False for a CPU kernel, which counts only for money
    gpus: bool = True
    price_per_gpu_hour: float = 0.0
    start: float | None = None

    def uses(self, budget: str) -> bool:
        """Whether holding this lease uses ``budget`` up (a free CPU kernel uses none)."""
        return self.gpus if budget != MONEY_PER_MONTH else self.price_per_gpu_hour > 0


@dataclass
class _Day:
    """What ended leases of one user (in one set of groups) used on one UTC day."""

    gpu_seconds: float = 0.0
    money: float = 0.0


@dataclass(frozen=True)
class Standing:
    """One budget of one scope at one moment."""

    scope: Scope
    budget: str
    limit: float
    used: float
    #: wall-clock time it resets (None for ``gpus``: it frees as leases end)
    resets_at: float | None
    #: how fast the scope's running leases use it now, per second (0 for ``gpus``)
    rate: float = 0.0

    @property
    def time_left(self) -> float | None:
        """Seconds until it is used up at today's rate; None if nothing uses it."""
        return None if self.rate <= 0 else max(0.0, self.limit - self.used) / self.rate

    @property
    def share(self) -> float:
        return 1.0 if self.limit <= 0 else self.used / self.limit

    def describe(self) -> str:
        """``4.00 of 4 GPU-hours today`` and the like."""
        if self.budget == GPUS:
            return f"{self.used:.0f} of {self.limit:.0f} GPUs held or waited for"
        if self.budget == GPU_HOURS_PER_DAY:
            return f"{_hours(self.used)} of {_hours(self.limit)} GPU-hours used today (UTC)"
        return f"${self.used:.2f} of ${self.limit:.2f} used this month (UTC)"

    def public(self) -> dict[str, Any]:
        """As the usage API shows it (GPU-hours in hours, money in the prices' currency)."""
        unit = 3600 if self.budget == GPU_HOURS_PER_DAY else 1
        figure = int if self.budget == GPUS else lambda value: round(value, 6)  # GPUs are whole
        return {
            "scope": self.scope.kind,
            "name": self.scope.name,
            "budget": self.budget,
            "limit": figure(self.limit / unit),
            "used": figure(self.used / unit),
            "left": figure(max(0.0, self.limit - self.used) / unit),
            "share": round(self.share, 4),
            "resets_at": self.resets_at,
        }


@dataclass(frozen=True)
class BudgetWarning:
    lease_id: str
    message: str
    #: when, at today's rate, the budget is used up and the lease ends (wall time), if it is used at all
    when: float | None


@dataclass(frozen=True)
class BudgetOverrun:
    lease_id: str
    message: str


def day_start(now: float) -> float:
    return now - now % _DAY


def month_start(now: float) -> float:
    moment = datetime.fromtimestamp(now, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


def next_month(now: float) -> float:
    moment = datetime.fromtimestamp(month_start(now), UTC)
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    return moment.replace(year=year, month=month).timestamp()


def utc_text(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M UTC")


class BudgetPolicy:
    def __init__(self, config: BudgetConfig | None = None,
                 price: Callable[[str], float] = lambda gpu_type: 0.0) -> None:
        """``price``: of one GPU-hour of a type, taken when a lease is granted (as metering bills it)."""
        self.config = config or BudgetConfig()
        self.price = price
        # Active leases one by one; ended ones folded into what each user used per day (in the
        # groups the lease was recorded under), so memory and each question's cost grow with
        # users and days, not with how many leases a month had.
        self._entries: dict[str, _Entry] = {}
        self._of_user: dict[str, dict[str, _Entry]] = {}
        self._of_group: dict[str, dict[str, _Entry]] = {}
        self._running: dict[str, _Entry] = {}
        self._days: dict[str, dict[frozenset[str], dict[float, _Day]]] = {}  # user -> groups -> day start ->
        self._day_users_of_group: dict[str, set[str]] = {}
        #: lease id -> (scope, budget, period start) it was warned of: once per period
        self._warned: dict[str, set[tuple[Scope, str, float]]] = {}
        self._pruned_before = 0.0
        #: budget scope -> its running leases (by lease id), for the scopes with a budget; None:
        #: to be built from the running leases (at start, and after the budgets changed)
        self._index: dict[Scope, tuple[Limits, dict[str, _Entry]]] | None = None
        #: budget scope -> when it next needs a look (None: never at today's rates)
        self._due_of: dict[Scope, float | None] = {}
        #: scopes to work out again at the next question: a lease started or ended in them, or
        #: due looked at them (so a question costs what changed, not every scope)
        self._stale: set[Scope] = set()
        #: (when, tie-break, scope) of the times in _due_of, soonest first; an entry whose time
        #: is no longer its scope's is dropped when met
        self._soonest: list[tuple[float, int, Scope]] = []
        self._pushes = itertools.count()

    def configure(self, config: BudgetConfig) -> None:
        """New budgets, in force from now on (running leases are measured against them at once)."""
        self.config = config
        self._index = None  # rebuilt when next asked, every scope in it to be worked out again
        self._due_of.clear()
        self._soonest.clear()

    # --- what happened ------------------------------------------------------------------------

    def requested(self, lease_id: str, user: str, choices: Sequence[GpuChoice], groups: Iterable[str]) -> None:
        # Until granted it holds the most GPUs any of its choices may take ("a100:4|a100" may get 4).
        count = _most_gpus(choices) or min(choice.count for choice in choices)
        self._add(_Entry(lease_id, user, frozenset(groups), count, gpus=not _cpu_only(choices)))

    def granted(self, lease_id: str, count: int, gpu_type: str, at: float) -> None:
        entry = self._entries.get(lease_id)
        if entry is not None:
            entry.count, entry.price_per_gpu_hour, entry.start = count, self.price(gpu_type), at
            entry.gpus = gpu_type != CPU_TYPE
            self._running[lease_id] = entry
            self._index_running(entry, add=True)

    def ended(self, lease_id: str, at: float) -> None:
        entry = self._entries.get(lease_id)
        if entry is None:
            return
        self._warned.pop(lease_id, None)
        if lease_id in self._running:
            self._index_running(entry, add=False)
        self._drop(entry)
        if entry.start is not None:  # one that never held a GPU counts for nothing
            self._fold(entry.user, entry.groups, entry.gpus, entry.count, entry.price_per_gpu_hour, entry.start, at)

    def load(self, user: str, groups: Iterable[str], gpu_type: str, count: int, price_per_gpu_hour: float,
             start: float, end: float) -> None:
        """A lease that ended before this gateway started (from the metering database)."""
        self._fold(user, frozenset(groups), gpu_type != CPU_TYPE, count, price_per_gpu_hour, start, end)
        self._due_of.clear()
        self._soonest.clear()
        self._stale.update(self._index or ())

    # --- questions ---------------------------------------------------------------------------

    def scopes(self, user: str, groups: Iterable[str]) -> list[tuple[Scope, Limits]]:
        """The budgets that apply to ``user`` in ``groups``: their own (or the default), their groups'."""
        config = self.config
        applying = [(Scope("user", user), config.users.get(user, config.default))]
        listed = {name for name, members in config.members.items() if user in members}
        for group in sorted(set(groups) | listed):
            limits = config.groups.get(group)
            if limits is not None:
                applying.append((Scope("group", group), limits))
        return applying

    def refusal(self, user: str, groups: Iterable[str], choices: Sequence[GpuChoice], now: float) -> str | None:
        """Why a request must be refused now (a budget it would go past), or None."""
        if self.config.empty:
            return None
        self._prune(now)
        # Its largest choice, not its smallest: the pool places choices in order, so "a100:8|a100"
        # under a budget of 1 GPU would get 8 when they are free.
        most = _most_gpus(choices)
        # CPU kernels are no GPUs, and cost money only where the operator gave them a price
        exempt = {GPUS, GPU_HOURS_PER_DAY} if _cpu_only(choices) else set()
        if _cpu_only(choices) and not self.price(CPU_TYPE) > 0:
            exempt.add(MONEY_PER_MONTH)
        for scope, limits in self.scopes(user, groups):
            for standing in self._standings(scope, limits, now):
                if standing.budget in exempt:
                    continue
                if standing.budget == GPUS:
                    if standing.used + most > standing.limit:
                        fallback = " (a request counts its largest choice)" if len(choices) > 1 else ""
                        return (f"budget {GPUS} of {scope} does not allow {most} more{fallback}: "
                                f"{standing.describe()}; it frees as leases end (%gpu release)" + _ask(scope))
                elif standing.used >= standing.limit:
                    assert standing.resets_at is not None
                    return (f"budget {standing.budget} of {scope} is used up: {standing.describe()}; it resets at "
                            f"{utc_text(standing.resets_at)}" + _ask(scope))
        return None

    def standings(self, user: str, groups: Iterable[str], now: float) -> list[Standing]:
        """Every budget that applies to the user, with what is used (the usage API shows it)."""
        self._prune(now)
        return [s for scope, limits in self.scopes(user, groups) for s in self._standings(scope, limits, now)]

    def due(self, now: float) -> tuple[list[BudgetWarning], list[BudgetOverrun]]:
        """Running leases to warn (a budget of theirs reached 90%) and to end (100%).

        Only the budgets whose time came (see :meth:`next_due`) are looked at: the pool ticks
        for every idle timeout too.
        """
        if self.config.empty:
            return [], []
        self._prune(now)
        warnings: list[BudgetWarning] = []
        overruns: dict[str, BudgetOverrun] = {}
        horizon = now + 1e-9 * max(1.0, abs(now))
        index = self._running_index()
        for scope in self._scopes_due(horizon):
            limits, running = index[scope]
            self._due_of.pop(scope, None)  # worked out again by the next next_due
            self._stale.add(scope)
            for standing in self._standings(scope, limits, now):
                leases = [entry for entry in running.values() if entry.uses(standing.budget)]
                if standing.budget == GPUS or not leases:
                    continue  # a lowered GPU cap applies to new requests; nothing running ends for it
                if _reached(standing, 1.0):
                    message = (f"budget {standing.budget} of {scope} is used up ({standing.describe()}), "
                               f"so the lease ended; it resets at {utc_text(standing.resets_at or now)}"
                               + _ask(scope))
                    for entry in leases:
                        overruns.setdefault(entry.lease_id, BudgetOverrun(entry.lease_id, message))
                elif _reached(standing, WARN_AT):
                    warnings.extend(self._warn(scope, standing, leases, now))
        return warnings, list(overruns.values())

    def next_due(self, now: float) -> float | None:
        """When :meth:`due` will next have something to say (wall clock), if ever at today's rates.

        Kept per budget scope and worked out again only for the scopes a lease started or ended
        in since, or that :meth:`due` looked at (the pool asks after every event, each cell's busy
        and idle included): a question costs what changed, not every scope.
        """
        if self.config.empty:
            return None
        index = self._running_index()
        if self._stale:
            self._prune(now)
        for scope in self._stale:
            found = index.get(scope)
            if found is None:
                continue  # no lease of its runs any more
            when = self._due_of[scope] = self._scope_due(scope, found[0], list(found[1].values()), now)
            if when is not None:
                heapq.heappush(self._soonest, (when, next(self._pushes), scope))
        self._stale.clear()
        if len(self._soonest) > 2 * len(self._due_of) + 64:  # mostly entries of times since moved
            self._soonest = [(when, next(self._pushes), scope) for scope, when in self._due_of.items()
                             if when is not None and scope in index]
            heapq.heapify(self._soonest)
        heap = self._soonest
        while heap:
            when, _, scope = heap[0]
            if self._current(scope, when):
                return when
            heapq.heappop(heap)
        return None

    def _scopes_due(self, horizon: float) -> list[Scope]:
        """The scopes :meth:`due` looks at: those whose time came, and those not worked out yet
        (they may be due now); users' before groups', so a lease past both is ended naming its user's."""
        index = self._running_index()
        scopes = {scope for scope in self._stale if scope in index}
        heap = self._soonest
        while heap and heap[0][0] <= horizon:
            when, _, scope = heapq.heappop(heap)
            if self._current(scope, when):
                scopes.add(scope)
        return sorted(scopes, key=lambda scope: (scope.kind != "user", scope.name))

    def _current(self, scope: Scope, when: float) -> bool:
        """Whether ``when`` is still the scope's time of its next look (else a heap entry is stale)."""
        return scope in (self._index or ()) and scope not in self._stale and self._due_of.get(scope) == when

    def _warn(self, scope: Scope, standing: Standing, leases: list[_Entry], now: float) -> list[BudgetWarning]:
        """The 90% warning, once per lease, scope, budget and period."""
        period = self._period_start(standing.budget, now)
        left = standing.time_left
        ends = None if left is None else now + left
        # the time of day, not a countdown: the notebook adds how soon from its own clock
        when = "" if ends is None else f" at this rate at {utc_text(ends)}"
        message = (f"{scope} has used {standing.share:.0%} of budget {standing.budget}: {standing.describe()}. "
                   f"It runs out{when}; then its leases end, keeping their variables")
        warnings = []
        for entry in leases:
            warned = self._warned.setdefault(entry.lease_id, set())
            if (scope, standing.budget, period) not in warned:
                warned.add((scope, standing.budget, period))
                warnings.append(BudgetWarning(entry.lease_id, message, ends))
        return warnings

    def _scope_due(self, scope: Scope, limits: Limits, running: list[_Entry], now: float) -> float | None:
        """When one scope's running leases next reach 90% (not yet warned) or 100% of a budget, or
        the budget resets first (then it is looked at again)."""
        soonest: float | None = None
        for standing in self._standings(scope, limits, now):
            leases = [entry for entry in running if entry.uses(standing.budget)]
            if standing.budget == GPUS or not leases:
                continue
            period = self._period_start(standing.budget, now)
            thresholds = [1.0]
            if any((scope, standing.budget, period) not in self._warned.get(e.lease_id, ()) for e in leases):
                thresholds.append(WARN_AT)
            for share in thresholds:
                if _reached(standing, share):
                    when = now
                elif standing.rate > 0:
                    when = now + (share * standing.limit - standing.used) / standing.rate
                    # usage restarts at the reset: nothing to do before it then
                    if standing.resets_at is not None and when > standing.resets_at:
                        when = standing.resets_at
                else:
                    continue
                soonest = when if soonest is None else min(soonest, when)
        return soonest

    # --- internals ------------------------------------------------------------------------

    def _add(self, entry: _Entry) -> None:
        self._entries[entry.lease_id] = entry
        self._of_user.setdefault(entry.user, {})[entry.lease_id] = entry
        for group in entry.groups:
            self._of_group.setdefault(group, {})[entry.lease_id] = entry

    def _drop(self, entry: _Entry) -> None:
        self._entries.pop(entry.lease_id, None)
        self._running.pop(entry.lease_id, None)
        for table, key in ((self._of_user, entry.user), *((self._of_group, g) for g in entry.groups)):
            mine = table.get(key)
            if mine is not None:
                mine.pop(entry.lease_id, None)
                if not mine:
                    del table[key]

    def _fold(self, user: str, groups: frozenset[str], gpus: bool, count: int, price_per_gpu_hour: float,
              start: float, end: float) -> None:
        """Add an ended lease's use to its user's days, split at each UTC midnight it ran across."""
        by_day = self._days.setdefault(user, {}).setdefault(groups, {})
        for group in groups:
            self._day_users_of_group.setdefault(group, set()).add(user)
        day = day_start(start)
        while day < end:
            seconds = max(0.0, min(end, day + _DAY) - max(start, day)) * count
            spent = by_day.setdefault(day, _Day())
            spent.gpu_seconds += seconds if gpus else 0.0
            spent.money += seconds * price_per_gpu_hour / 3600
            day += _DAY

    def _prune(self, now: float) -> None:
        """Days before this month count for nothing any more."""
        since = month_start(now)
        if since <= self._pruned_before:
            return
        self._pruned_before = since
        for user, by_groups in list(self._days.items()):
            for groups, by_day in list(by_groups.items()):
                for day in [day for day in by_day if day < since]:
                    del by_day[day]
                if not by_day:
                    del by_groups[groups]
            if not by_groups:
                del self._days[user]
        for group, users in list(self._day_users_of_group.items()):
            users.intersection_update(self._days)
            if not users:
                del self._day_users_of_group[group]

    def _days_in_scope(self, scope: Scope) -> list[dict[float, _Day]]:
        """The per-day use of the scope's ended leases, one table per user and set of groups."""
        if scope.kind == "user":
            return list(self._days.get(scope.name, {}).values())
        tables = []
        for user in self._day_users_of_group.get(scope.name, set()) | self.config.members.get(scope.name, set()):
            for groups, by_day in self._days.get(user, {}).items():
                if scope.name in groups or user in self.config.members.get(scope.name, ()):
                    tables.append(by_day)
        return tables

    def _in_scope(self, scope: Scope) -> list[_Entry]:
        if scope.kind == "user":
            return list(self._of_user.get(scope.name, {}).values())
        found = dict(self._of_group.get(scope.name, {}))
        for user in self.config.members.get(scope.name, ()):
            found.update(self._of_user.get(user, {}))
        return list(found.values())

    def _running_index(self) -> dict[Scope, tuple[Limits, dict[str, _Entry]]]:
        if self._index is None:
            self._index = {}
            for entry in self._running.values():
                self._index_running(entry, add=True)
        return self._index

    def _index_running(self, entry: _Entry, add: bool) -> None:
        """A lease started or ended: file it under its scopes, whose next look is worked out again."""
        if self._index is None:
            return  # built from the running leases when next asked
        for scope, limits in self.scopes(entry.user, entry.groups):
            if limits == _NO_LIMITS:
                continue
            self._due_of.pop(scope, None)
            self._stale.add(scope)
            if add:
                self._index.setdefault(scope, (limits, {}))[1][entry.lease_id] = entry
                continue
            running = self._index.get(scope)
            if running is not None:
                running[1].pop(entry.lease_id, None)
                if not running[1]:
                    del self._index[scope]

    def _standings(self, scope: Scope, limits: Limits, now: float) -> list[Standing]:
        if limits == _NO_LIMITS:
            return []
        today, month = day_start(now), month_start(now)
        held = gpu_seconds = gpu_rate = money = money_rate = 0.0
        for e in self._in_scope(scope):  # one pass: the pool asks after every lease event
            if e.gpus:
                held += e.count
            if e.start is None:
                continue
            running = max(0.0, now - max(e.start, month)) * e.count
            money += running * e.price_per_gpu_hour / 3600
            money_rate += e.count * e.price_per_gpu_hour / 3600
            if e.gpus:
                gpu_seconds += max(0.0, now - max(e.start, today)) * e.count
                gpu_rate += e.count
        for by_day in self._days_in_scope(scope):
            spent = by_day.get(today)
            gpu_seconds += spent.gpu_seconds if spent is not None else 0.0
            money += sum(spent.money for day, spent in by_day.items() if day >= month)
        found = []
        if limits.gpus is not None:
            found.append(Standing(scope, GPUS, limits.gpus, held, None))
        if limits.gpu_hours_per_day is not None:
            # the limit in GPU-seconds, the unit `used` counts in, so every comparison is like for like
            found.append(Standing(scope, GPU_HOURS_PER_DAY, limits.gpu_hours_per_day * 3600, gpu_seconds,
                                  today + _DAY, gpu_rate))
        if limits.money_per_month is not None:
            found.append(Standing(scope, MONEY_PER_MONTH, limits.money_per_month, money, next_month(now), money_rate))
        return found

    @staticmethod
    def _period_start(budget: str, now: float) -> float:
        return day_start(now) if budget == GPU_HOURS_PER_DAY else month_start(now)


_NO_LIMITS = Limits()


def _most_gpus(choices: Sequence[GpuChoice]) -> int:
    """The most GPUs a request may be granted (CPU kernels are none)."""
    return max((choice.count for choice in choices if choice.gpu_type != CPU_TYPE), default=0)


def _cpu_only(choices: Sequence[GpuChoice]) -> bool:
    return all(choice.gpu_type == CPU_TYPE for choice in choices)


def _reached(standing: Standing, share: float) -> bool:
    # a deadline computed from a rate lands within rounding of the threshold
    target = share * standing.limit
    return standing.used >= target - 1e-9 * max(1.0, abs(target))


def _ask(scope: Scope) -> str:
    table = "users" if scope.kind == "user" else "groups"
    return f" (ask the operator to raise c.Budgets.{table}[{scope.name!r}])"


def _hours(seconds: float) -> str:
    """GPU-seconds as GPU-hours, with the digits a small budget needs to show what moved."""
    hours = seconds / 3600
    return f"{hours:.2f}" if hours >= 0.1 or hours == 0 else f"{hours:.2g}"


