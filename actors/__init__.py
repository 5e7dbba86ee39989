"""Model actors and the node agent.

`actors.runtime` is the actor process (one per model and device); `actors.backends`
holds the execution backends (emulated, noop; the diffusers backend plugs in through
`actors.backends.register_backend`); `actors.agent` is the per-host node agent.
"""
