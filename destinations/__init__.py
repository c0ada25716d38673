"""Destination actors: one module per destination, plus what they share.

Each destination is a supervised actor (`destinations.base.Destination`) that
receives the sends of finished runs and reports every outcome on the send's
`Delivery` record. Imports `actors`, never `runtime`.
"""
