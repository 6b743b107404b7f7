"""Attention on one device: the one call every model uses (backends.py), the exact (o, lse) merge
(merge.py), decode attention over a KV cache (decode.py), and the block-diagonal packed paths
(packed.py). Attention across ranks (Ulysses, ring, hybrid, sp decode) is in distvit.parallel."""
from distvit.attention.backends import ATTENTION_BACKENDS, attention, list_backends
from distvit.attention.decode import decode_attention
from distvit.attention.merge import merge_partials, merge_two

__all__ = ["ATTENTION_BACKENDS", "attention", "list_backends", "decode_attention", "merge_partials", "merge_two"]
