"""The packed forward of a sequence-parallel ViT (parallelize.py): each sp rank embeds and runs only its
share of the packed token sequence; image boundaries may fall anywhere in the shards.

The full token layout (models/packed.py: prefix tokens then patches per image, end padding) is
built on every rank from the PackedBatch (cheap index tables), padded to the sp layout's multiple,
and each rank takes its positions (contiguous or zigzag). Attention is block-diagonal through
the tokens' image ids, passed to the sp attention (Ulysses gathers them, the ring computes only
the rectangles of shared images). Pooling: each rank scatters the prefix outputs and sums the
patch outputs it holds per image; the pieces are summed over the sp group (replicated result,
identity backward: see parallelize.py) and the head runs on every rank.
"""
from __future__ import annotations

from distvit.parallel.sequence_parallel import local_positions, padded_length
from distvit.models.packed import embed, patch_counts, pool, token_layout


def forward_packed(model, packed, sum_replicated):
    """Logits (N, classes), identical on every sp rank; sum_replicated(x, group): the group sum."""
    plan = model.sequence_parallel
    layout = token_layout(packed, model.num_prefix_tokens)
    total = padded_length(layout.length, plan.sp_size, plan.layout)
    positions = local_positions(total, plan.sp_rank, plan.sp_size, plan.layout).to(layout.seq_ids.device)
    local = layout.padded(total).select(positions)
    x = model.forward_blocks(embed(model, packed, local), seq_ids=local.seq_ids)
    prefix, sums = pool(model, x, local)
    prefix, sums = sum_replicated(prefix, plan.group), sum_replicated(sums, plan.group)
    return model.forward_pooled(prefix, sums / patch_counts(packed, sums))
