"""The list of recent runs (`Runtime.recent_runs`, `GET /runs`): filtered, paged, newest first.

Owns `RunQuery` (what is asked, checked: a bad value raises `ValueError`
naming the parameter and the rule), `RunSummary` (one run as the list shows
it: its result and, per destination, how many of its sends are delivered,
retrying, failed or pending) and `RunPage` (one page and the cursor of the
next, and on the first page this node's runs in progress apart: they are not
in the history yet, so they stay out of its paging). Lists what it is
given: the ledger's history (`Ledger.kept_runs`, the runs this node ran,
the last `OUTBOUND_RUN_HISTORY` of them) or, in a cluster, every node's
(`outbound.journal.run_records.RunRecords.kept_runs`, whose deliveries are
`Delivery` records: both have `destination` and `status`). Must not import
the runtime facade.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from outbound.destinations.delivery import Send

MAX_LIMIT = 500
RUN_STATUSES = ("running", "succeeded", "ended", "failed")
DELIVERY_STATUSES = ("delivered", "retrying", "failed", "pending")
MAX_ID_LENGTH = 200
ERROR_EXCERPT = 200  # characters of a failed run's error shown in the list


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Which runs, and how many: checked when made (`ValueError` naming the parameter)."""

    limit: int = 50
    before: str | None = None  # a run id: the runs that ended before it (the next page)
    workflow: str | None = None
    status: str | None = None  # the run's status
    destination: str | None = None  # runs with at least one send to it
    delivery: str | None = None  # runs with at least one send in this status (of `destination`)

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int):
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        for name in ("before", "workflow", "destination"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH
            ):
                raise ValueError(f"{name} must be a non-empty text of at most {MAX_ID_LENGTH}")
        if self.status is not None and self.status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}")
        if self.delivery is not None and self.delivery not in DELIVERY_STATUSES:
            raise ValueError(f"delivery must be one of {', '.join(DELIVERY_STATUSES)}")


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run in the list: its result and its sends counted per destination and status."""

    run_id: str
    workflow_id: str
    status: str
    started_at: float
    duration: float
    sends: int
    error: str | None
    destinations: dict[str, dict[str, int]]

    @classmethod
    def in_progress(cls, run: Any, now: float) -> RunSummary:
        """A run still running (its `RunFuture`): its sends are told only when it ends."""
        return cls(
            run.run_id,
            run.workflow_id,
            "running",
            run.submitted_at,
            now - run.submitted_at,
            0,
            None,
            {},
        )

    @classmethod
    def of(cls, result: Any, sends: Sequence[Send]) -> RunSummary:
        return cls(
            result.run_id,
            result.workflow_id,
            result.status,
            result.started_at,
            result.duration,
            result.sends,
            _excerpt(result.error),
            count_by_destination(sends),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow_id": self.workflow_id,
            "status": self.status,
            "started_at": self.started_at,
            "duration": self.duration,
            "sends": self.sends,
            "error": self.error,
            "destinations": self.destinations,
        }


@dataclass(frozen=True, slots=True)
class RunPage:
    """A page of the list, newest first; `next` is the `before` of the following page.

    `running`: on the first page (no `before`), this node's runs in progress that match,
    newest first, at most `limit` of `running_total`; every other page has none.
    """

    runs: list[RunSummary]
    next: str | None
    kept: int  # runs in the history listed
    filters: dict[str, Any] = field(default_factory=dict)
    scope: str = "node"  # "node": this node's runs; "cluster": every node's
    running: list[RunSummary] = field(default_factory=list)
    running_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": [summary.as_dict() for summary in self.runs],
            "next": self.next,
            "kept": self.kept,
            "scope": self.scope,
            "filters": self.filters,
            "running": [summary.as_dict() for summary in self.running],
            "running_total": self.running_total,
        }


def count_by_destination(sends: Iterable[Send]) -> dict[str, dict[str, int]]:
    """`{destination: {delivered, retrying, failed, pending}}` of a run's sends, as of now."""
    counted = collections.Counter((send.destination, send.status) for send in sends)
    by_destination: dict[str, dict[str, int]] = {}
    for (destination, status), count in counted.items():
        counts = by_destination.setdefault(destination, dict.fromkeys(DELIVERY_STATUSES, 0))
        counts[status] = counts.get(status, 0) + count
    return by_destination


def _matches(result: Any, sends: Sequence[Send], query: RunQuery) -> bool:
    if query.workflow is not None and result.workflow_id != query.workflow:
        return False
    if query.status is not None and result.status != query.status:
        return False
    if query.destination is None and query.delivery is None:
        return True
    return any(
        (query.destination is None or send.destination == query.destination)
        and (query.delivery is None or send.status == query.delivery)
        for send in sends
    )


def list_runs(
    kept: Sequence[tuple[Any, Sequence[Send] | Sequence[Any]]],
    query: RunQuery,
    scope: str = "node",
    in_progress: Iterable[Any] = (),
) -> RunPage:
    """The page of `kept` (newest first, `Ledger.kept_runs()`) that `query` asks for.

    `before` names the last run of the previous page; a run no longer kept
    (the history only drops its oldest) means nothing older is kept either:
    an empty page. `in_progress`: the runs still running (`RunFuture`s).
    """
    filters = {
        name: value
        for name in ("workflow", "status", "destination", "delivery")
        if (value := getattr(query, name)) is not None
    }
    if query.status == "running":  # none of the history is
        running, running_total = _running(in_progress, query, set())
        return RunPage([], None, len(kept), filters, scope, running, running_total)
    start = 0
    if query.before is not None:
        start = next(
            (index + 1 for index, (result, _) in enumerate(kept) if result.run_id == query.before),
            len(kept),
        )
    found: list[RunSummary] = []
    more = False
    for result, sends in kept[start:]:
        if not _matches(result, sends, query):
            continue
        if len(found) == query.limit:
            more = True
            break
        found.append(RunSummary.of(result, sends))
    next_before = found[-1].run_id if more else None
    # A run that ended while the two were read is in both: it is listed as ended.
    running, running_total = _running(in_progress, query, {run.run_id for run in found})
    return RunPage(found, next_before, len(kept), filters, scope, running, running_total)


def _running(
    in_progress: Iterable[Any], query: RunQuery, listed: set[str]
) -> tuple[list[RunSummary], int]:
    """The runs in progress the first page shows (but those `listed` as ended): none sent
    anything yet (sends are told when a run ends), so a destination or delivery filter
    matches none of them."""
    if query.before is not None or query.destination is not None or query.delivery is not None:
        return [], 0
    if query.status not in (None, "running"):
        return [], 0
    matching = [
        run
        for run in in_progress
        if (query.workflow is None or run.workflow_id == query.workflow)
        and run.run_id not in listed
    ]
    matching.sort(key=lambda run: run.submitted_at, reverse=True)
    now = time.time()
    return [RunSummary.in_progress(run, now) for run in matching[: query.limit]], len(matching)


def _excerpt(error: str | None) -> str | None:
    if error is None or len(error) <= ERROR_EXCERPT:
        return error
    return error[: ERROR_EXCERPT - 1] + "…"
