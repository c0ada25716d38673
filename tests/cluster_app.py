"""The application every node of the cluster tests serves: `outbound serve --app cluster_app:rt`.

Owns the tests' workflows and nothing else. Each run of `deliver` sends
`{"seq", "node"}` to the HTTP URL and the SQL table its event names, where
`node` is the node that ran it (`OUTBOUND_NODE_ID`): this is how a test sees
who ran what without asking the runtime. `stream` sends the same to the SSE
channel `c`; `emitter` emits its event and `listener` (listening to it) sends
`{"seq", "node"}` to the HTTP URL and returns it (with `ctx.depth`); `loop`
emits to itself; `fails` raises (tests/test_cluster_views.py).
Configured by `OUTBOUND_*` alone (`Config.from_env()`);
tests/cluster_support.py starts the processes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from outbound import Config, Runtime

#: The plain workflow, and one whose id holds every character a NATS subject reserves.
WORKFLOW = "deliver"
SUBJECT_CHARACTERS_WORKFLOW = "a.b *>c"
#: Send `{"seq", "node"}` on the SSE channel `SSE_CHANNEL` of their own streams.
SSE_WORKFLOW = "stream"
SSE_SUBJECT_CHARACTERS_WORKFLOW = "s.s *>e"
SSE_CHANNEL = "c"
#: Fails with ValueError: its run's record has a traceback.
FAILING_WORKFLOW = "fails"
#: `EMITTER` emits its event with the node that ran it; `LISTENER` listens to it.
EMITTER = "emitter"
LISTENER = "listener"
#: Listens to itself: each run emits again, until the depth limit stops the chain.
LOOP_WORKFLOW = "loop"


def register(runtime: Runtime, node_id: str) -> Runtime:
    """Add the tests' workflows to `runtime`; its sends name `node_id` as the node that ran them."""

    def deliver(event: dict[str, Any], ctx: Any) -> None:
        if event.get("delay"):
            time.sleep(event["delay"])  # runs in flight when a node is killed
        payload = {"seq": event["seq"], "node": node_id}
        ctx.send.http(url=event["url"], method="POST", data=payload)
        ctx.send.sql(table=event["table"], payload=payload)

    for workflow_id in (WORKFLOW, SUBJECT_CHARACTERS_WORKFLOW):
        runtime.workflow(workflow_id)(deliver)

    def stream(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.sse(channel=SSE_CHANNEL, payload={"seq": event["seq"], "node": node_id})

    for workflow_id in (SSE_WORKFLOW, SSE_SUBJECT_CHARACTERS_WORKFLOW):
        runtime.workflow(workflow_id)(stream)

    @runtime.workflow(FAILING_WORKFLOW)
    def fails(event: dict[str, Any], ctx: Any) -> None:
        raise ValueError(f"event {event['seq']} fails on {node_id}")

    @runtime.workflow(EMITTER)
    def emitter(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.emit(raw_event={"seq": event["seq"], "url": event["url"], "emitted_on": node_id})

    @runtime.workflow(LISTENER, listens_to=[EMITTER])
    def listener(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
        payload = {"seq": event["seq"], "node": node_id}
        ctx.send.http(url=event["url"], method="POST", data=payload)
        return {**payload, "depth": ctx.depth}  # the run's `value` in GET /runs/{id}

    @runtime.workflow(LOOP_WORKFLOW, listens_to=[LOOP_WORKFLOW])
    def loop(event: dict[str, Any], ctx: Any) -> None:
        ctx.send.emit(raw_event={"hop": event["hop"] + 1, "emitted_on": node_id})

    return runtime


_node_runtime: Runtime | None = None


def __getattr__(name: str) -> Runtime:
    """`cluster_app.rt`: the node's Runtime, made on first use from its environment.

    Lazy, so that the test process can import `register` without making a Runtime.
    """
    global _node_runtime
    if name != "rt":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _node_runtime is None:
        node_id = os.environ.get("OUTBOUND_NODE_ID", "")
        _node_runtime = register(Runtime(Config.from_env()), node_id)
    return _node_runtime
