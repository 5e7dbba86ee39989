"""The scheduler actor: replicas per model, placement, parallel groups, admission.

Its policies are pure functions of a telemetry snapshot (`broker.protocol.Stats`) and
act through node agents and the broker. Built in a later issue; the broker already
exposes the snapshot it will read and the admin spawn path it will drive.
"""
