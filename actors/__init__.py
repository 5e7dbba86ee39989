"""Model actors and the node agent.

`actors.runtime` is the actor process (one per model and device), built of parts:
`actors.session` (what its compute and heartbeat threads share), `actors.batch`,
`actors.fetcher`, `actors.heartbeat` and `actors.data_server`; `actors.backends`
holds the execution backends (emulated, monolith, noop, and the `diffusers/` package
of blocks, registered by name); `actors.agent` is the per-host node agent;
`actors.store`, `actors.shm`, `actors.cuda_ipc` and `actors.addresses` are the data
plane. Actors read the broker's shared base only (protocol, catalog, costs, config, logs).
"""
