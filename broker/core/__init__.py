"""The broker's sans-IO core: the state machine `broker.server` runs.

`machine.BrokerCore` routes each event to a part and returns what the event sends.
Tables that own state: `actors` (actors and agents), `directory` (requests, DAGs,
ready queues, tensor holders and reference counts), `load`, `metering`, the
operator's state in `admin`, and `outbox` (one event's sends). Parts that act on the
tables they are given: `intake`, `dispatch` (applying the pure `choosers`),
`results`, `recovery`, `peers`, `admin`. Pure functions: `choosers`, `rules`,
`telemetry`; `settings` declares every setting once. Importing this package loads
none of them.
"""
