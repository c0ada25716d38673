"""The journal: durable hand-off of accepted sends on NATS JetStream (issue 14).

`server` runs the embedded nats-server of `OUTBOUND_JOURNAL=local`.
"""
