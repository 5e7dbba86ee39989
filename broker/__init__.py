"""The broker: the control-plane hub of a LegoDiffusion cluster, and the shared base
every process reads.

Shared base: `broker.protocol` (the wire protocol, a leaf), `broker.catalog` (workflows,
parameter checks, DAG unrolling), `broker.costs` (cost model and profiles),
`broker.config`, `broker.logs`, `broker.rundir`, `broker.auth`. The broker process:
`broker.core` (the sans-IO state machine and its parts), `broker.journal` (accepted
requests on disk) and `broker.server` (the ZeroMQ shell that runs them). Importing this
package loads none of them.
"""
