"""Destinations: the delivery core, and one folder per destination.

The core, in this folder, is what every destination shares: send records and
the ledger (`delivery.py`), the destination base (`base.py`), batching,
retries, backoff and dead letters, the checks every `ctx.send` call shares
(`validation.py`, with `SendError`) and the shared settings (`settings.py`).
Each destination is a subpackage, `<kind>/`, of the same shape (`settings.py`,
`send.py`, `actor.py` and its service code); `registry.py` lists them for the
runtime and `ctx.send`. Each destination is a supervised actor that receives
the sends of finished runs and reports every outcome on the send's record.
Imports `outbound.actors`, never the runtime; no destination imports another.
"""
