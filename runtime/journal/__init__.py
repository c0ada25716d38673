"""The journal: sends and events kept in NATS JetStream until they are final (README: Durability).

`settings` (the `OUTBOUND_JOURNAL*` settings), `codec` (messages as bytes),
`entries` (what the settle path counts down), `journal` (the JetStream client),
`writes` (its deletes and background stores), `cluster` (nodes sharing one NATS),
`recovery` (what a start reads back) and `server` (the embedded nats-server of
`OUTBOUND_JOURNAL=local`). The runtime's hand-off, shutdown and facade use
them; nothing here imports the facade.
"""
