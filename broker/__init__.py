"""The broker: the control-plane hub of a LegoDiffusion cluster.

`broker.protocol` is the wire protocol every process imports; `broker.catalog` the
workflow catalog and DAG unrolling; `broker.core.machine` the sans-IO broker state machine;
`broker.server` the thin ZeroMQ shell that runs it. Importing this package loads none
of them.
"""
