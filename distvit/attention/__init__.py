"""Attention: the one call every model uses (backends.py), the exact (o, lse) merge (merge.py),
decode attention over a KV cache (decode.py) and sequence-parallel attention (sequence_parallel.py)."""
from distvit.attention.backends import ATTENTION_BACKENDS, attention, list_backends
from distvit.attention.decode import decode_attention, decode_attention_sp
from distvit.attention.merge import merge_partials, merge_two
from distvit.attention.sequence_parallel import ring_attention, ulysses_attention

__all__ = [
    "ATTENTION_BACKENDS", "attention", "list_backends", "decode_attention", "decode_attention_sp",
    "merge_partials", "merge_two", "ring_attention", "ulysses_attention",
]
