"""Benchmarks (`lego bench ...`): the load generator, the systems compared, the
emulated-cluster and gateway benchmarks, the GPU check and the simulator (`sim/`).

Built on the client library and the lower layers; nothing below `clients` imports it.
"""
