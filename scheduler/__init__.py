"""The scheduler actor: replicas per model, placement, parallel groups, admission.

`controller` is the process (`lego scheduler`, `python -m scheduler.controller`): it
reads the broker's telemetry (`snapshot`), runs one pure planning round (`plan`, over
`scaling` and `placement`) and acts through the broker (`link`, its own DEALER) and
the node agents. The policies are pure functions of a typed snapshot, so the simulator
(`clients.bench.sim`) runs the same decisions in virtual time. This package reads the
broker's shared base (protocol, catalog, cost model, config, logs) and nothing else.
"""
