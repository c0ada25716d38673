"""What every node of a cluster shows alike: `ClusterViews` (SSE, the emit log, run records).

Owns starting and stopping the three shared views of a cluster node
(`sse.ClusterSse`, `emits.ClusterEmits`, `run_records.RunRecords`) in the
right order: started once the journal is open and before recovered sends are
handed on (a recovered SSE send must go to the cluster's stream, not to this
node's hub alone); stopped after the destinations drained and before the
journal closes (the last run records are stored). Must not import the
runtime facade.
"""

from __future__ import annotations

import logging
from typing import Any

from outbound.destinations.delivery import Ledger
from outbound.destinations.emit.log import EmitLog
from outbound.destinations.sse.hub import SseHub
from outbound.journal.emits import ClusterEmits
from outbound.journal.run_records import RunRecords
from outbound.journal.sse import ClusterSse

logger = logging.getLogger(__name__)


class ClusterViews:
    """One node's part in the cluster-wide views; `start()` and `stop()` once each."""

    def __init__(
        self, journal: Any, hub: SseHub, emit_log: EmitLog, ledger: Ledger, run_history: int
    ) -> None:
        self.sse = ClusterSse(journal, hub)
        self.emits = ClusterEmits(journal, emit_log)
        self.run_records = RunRecords(journal, ledger, run_history)

    def start(self) -> ClusterViews:
        self.sse.start()
        self.emits.start()
        self.run_records.start()
        return self

    def stop(self) -> None:
        for view in (self.run_records, self.emits, self.sse):
            try:
                view.stop()
            except Exception:
                logger.exception("cluster: stopping %s failed", type(view).__name__)

    def state(self) -> dict[str, Any]:
        return {**self.sse.state(), **self.run_records.state()}
