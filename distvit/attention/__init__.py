"""Attention: the one call every model uses (backends.py), plus the exact (o, lse) merge (merge.py)
and decode attention over a KV cache (decode.py)."""
from distvit.attention.backends import ATTENTION_BACKENDS, attention, list_backends

__all__ = ["ATTENTION_BACKENDS", "attention", "list_backends"]
