"""The cost model every process may read: measured profiles (`profiles`, the H800
tables in `h800/`) and what a workflow's nodes cost on them (`model`).

The broker's admission and load tracking price requests with it, the emulated actors
replay it, the scheduler plans with it and the simulator runs on it.
"""
