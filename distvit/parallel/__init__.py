"""Everything about ranks that is new code: sequence-parallel decode (decode_sp.py).

The older rank wiring still lives in distvit/dist.py, distvit/attention/sequence_parallel.py and
distvit/models/parallelize*.py (docs/design.md names this package as its target home).
"""
