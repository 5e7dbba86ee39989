"""The broker's sans-IO core: the state machine `broker.server` runs.

`machine` is the core (events in, sends out); its parts keep their own state: the
request and tensor tables (`state`), pending work (`load`), meters (`metering`), and
the pure rules it applies at arrival (`rules`). Importing this package loads none of them.
"""
