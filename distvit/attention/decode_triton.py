"""Triton kernel for decode attention: stream-K (Lean Attention) and split-K schedules.

Work is cut into *segments* and *tiles*. A segment is one (batch, kv head, row group): the
query rows of all query heads that share the kv head (times the Tq new tokens), which read
that kv head's K/V once. A tile is BLOCK_N consecutive cache positions of a segment. The
tiles of all segments, laid end to end, form one line of `total` tiles.

- streamk: a persistent grid of P programs; program p takes the tiles
  [p * span, (p + 1) * span) with span = ceil(total / P). A span may start inside one
  segment and end inside another, across head and batch boundaries.
- splitk: each segment gets a fixed number of programs (splits), each a fixed range of tiles;
  splits beyond a short sequence's length get nothing (the imbalance stream-K removes).

A program that covers a whole segment writes the final output. Otherwise each program that
covers part of a segment (a *piece*) writes its online-softmax state (acc, m, l) to a
workspace slot and bumps the segment's arrival counter; the program that arrives last
merges every piece exactly and writes the output, then resets the counter to 0 for the next
call. Nobody waits on anybody, so the schedule is deadlock-free for any grid size and also
runs under Triton's interpreter, which executes programs one after another.

See docs/decode_attention.md for the cost model and the causal convention.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tiles(q, K, V, k_base, v_base, skt, skd, svt, svd, j_lo, j_hi, seqlen, last_visible,
                  qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  HEAD_DIM: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax over tiles [j_lo, j_hi) of one segment. Scores are kept in log2 units."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    for j in range(j_lo, j_hi):
        offs_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen
        offs_n64 = offs_n.to(tl.int64)
        kt = tl.load(K + k_base + offs_n64[None, :] * skt + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee") * qk_scale
        else:
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        # Row r sees cache positions <= last_visible[r] (< seqlen: past it the loads gave 0).
        s = tl.where(offs_n[None, :] <= last_visible[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift by 0 there so that
        # exp2(-inf - -inf) never produces NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_base + offs_n64[:, None] * svt + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        p_v = p.to(v.dtype)  # probabilities rounded to the cache dtype, as on the tensor cores
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p_v.to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p_v, v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_final(O, LSE, acc, m_i, l_i, o_base, lse_base, rows_o, rows_lse, row_ok,
                 BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(O + o_base + rows_o[:, None] + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + lse_base + rows_lse, lse, mask=row_ok)


@triton.jit
def _piece(Q, K, V, O, LSE, LENS, VISIBLE, ACC_WS, ML_WS, COUNTERS,
           sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, slb, slh,
           pid, seg, j_lo, j_hi, p_first, n_contrib, my_slot, first_slot,
           n_kv_heads, n_row_groups, qk_scale,
           G: tl.constexpr, TQ: tl.constexpr, HEAD_DIM: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """Attend tiles [j_lo, j_hi) of segment `seg`; write the output or a partial."""
    rg = seg % n_row_groups
    bh = seg // n_row_groups
    h = bh % n_kv_heads
    b = (bh // n_kv_heads).to(tl.int64)
    seqlen = tl.load(LENS + b)
    visible_len = tl.load(VISIBLE + b)

    rows = rg * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * TQ
    g = rows // TQ
    tok = rows % TQ
    head = (h * G + g).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * sqb + head[:, None] * sqh + tok[:, None] * sqt + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # Bottom-right causal bound, and never past the keys this cache holds.
    last_visible = tl.minimum(visible_len - TQ + tok, seqlen - 1)

    acc, m_i, l_i = _attend_tiles(q, K, V, b * skb + h.to(tl.int64) * skh, b * svb + h.to(tl.int64) * svh,
                                  skt, skd, svt, svd, j_lo, j_hi, seqlen, last_visible, qk_scale,
                                  BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, DOT_FP32)
    o_base = b * sob
    rows_o = head * soh + tok * sot
    lse_base = b * slb
    rows_lse = head * slh + tok
    if n_contrib == 1:
        _store_final(O, LSE, acc, m_i, l_i, o_base, lse_base, rows_o, rows_lse, row_ok, BLOCK_D, HEAD_DIM)
    else:
        local = tl.arange(0, BLOCK_M)
        slot = pid * 2 + my_slot
        tl.store(ACC_WS + (slot * BLOCK_M + local[:, None]) * BLOCK_D + offs_d[None, :], acc)
        tl.store(ML_WS + (slot * 2) * BLOCK_M + local, m_i)
        tl.store(ML_WS + (slot * 2 + 1) * BLOCK_M + local, l_i)
        # Every thread's stores must be done before the counter says "arrived".
        tl.debug_barrier()
        arrived = tl.atomic_add(COUNTERS + seg, 1, sem="acq_rel")
        if arrived == n_contrib - 1:
            m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_all = tl.full([BLOCK_M], 0.0, tl.float32)
            acc_all = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
            for i in range(0, n_contrib):
                other = (p_first + i) * 2 + tl.where(i == 0, first_slot, 0)
                # .cg: read from L2, where the other programs' stores landed, not from L1.
                acc_o = tl.load(ACC_WS + (other * BLOCK_M + local[:, None]) * BLOCK_D + offs_d[None, :],
                                cache_modifier=".cg")
                m_o = tl.load(ML_WS + (other * 2) * BLOCK_M + local, cache_modifier=".cg")
                l_o = tl.load(ML_WS + (other * 2 + 1) * BLOCK_M + local, cache_modifier=".cg")
                m_new = tl.maximum(m_all, m_o)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                a_all = tl.math.exp2(m_all - m_use)
                a_o = tl.math.exp2(m_o - m_use)
                acc_all = acc_all * a_all[:, None] + acc_o * a_o[:, None]
                l_all = l_all * a_all + l_o * a_o
                m_all = m_new
            _store_final(O, LSE, acc_all, m_all, l_all, o_base, lse_base, rows_o, rows_lse, row_ok,
                         BLOCK_D, HEAD_DIM)
            tl.atomic_xchg(COUNTERS + seg, 0)


@triton.jit
def _decode_kernel(Q, K, V, O, LSE, LENS, VISIBLE, SEG_START, ACC_WS, ML_WS, COUNTERS,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, slb, slh,
                   n_kv_heads, n_row_groups, n_segments, grid_size, num_splits, tiles_per_split, qk_scale,
                   G: tl.constexpr, TQ: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLITK: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    if SPLITK:
        seg = pid // num_splits
        split = pid % num_splits
        seg_lo = tl.load(SEG_START + seg)
        n_tiles = tl.load(SEG_START + seg + 1) - seg_lo
        j_lo = split * tiles_per_split
        j_hi = tl.minimum(j_lo + tiles_per_split, n_tiles)
        if j_lo < j_hi:
            n_contrib = (n_tiles + tiles_per_split - 1) // tiles_per_split
            _piece(Q, K, V, O, LSE, LENS, VISIBLE, ACC_WS, ML_WS, COUNTERS,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, slb, slh,
                   pid, seg, j_lo, j_hi, seg * num_splits, n_contrib, 0, 0,
                   n_kv_heads, n_row_groups, qk_scale, G, TQ, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32)
    else:
        total = tl.load(SEG_START + n_segments)
        span = (total + grid_size - 1) // grid_size
        t = pid * span
        end = tl.minimum(t + span, total)
        while t < end:
            # Binary search: the last segment starting at or before tile t. Empty segments
            # share their start with the next one, so the last such segment holds tile t.
            lo = 0
            hi = n_segments - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if tl.load(SEG_START + mid) <= t:
                    lo = mid
                else:
                    hi = mid - 1
            seg_lo = tl.load(SEG_START + lo)
            seg_hi = tl.load(SEG_START + lo + 1)
            piece_end = tl.minimum(end, seg_hi)
            p_first = seg_lo // span
            p_last = (seg_hi - 1) // span
            # Slot 1 holds the piece that opens a segment, slot 0 the one that closes or
            # continues it: a program can hold one of each, never two of the same kind.
            my_slot = tl.where(pid == p_first, 1, 0)
            _piece(Q, K, V, O, LSE, LENS, VISIBLE, ACC_WS, ML_WS, COUNTERS,
                   sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sob, soh, sot, slb, slh,
                   pid, lo, t - seg_lo, piece_end - seg_lo, p_first, p_last - p_first + 1, my_slot, 1,
                   n_kv_heads, n_row_groups, qk_scale, G, TQ, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, DOT_FP32)
            t = piece_end

    # Segments with no tiles (length 0) are never visited above: give them o = 0, lse = -inf.
    for seg in range(pid, n_segments, grid_size):
        if tl.load(SEG_START + seg + 1) == tl.load(SEG_START + seg):
            rg = seg % n_row_groups
            bh = seg // n_row_groups
            h = bh % n_kv_heads
            b = (bh // n_kv_heads).to(tl.int64)
            rows = rg * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < G * TQ
            head = (h * G + rows // TQ).to(tl.int64)
            tok = rows % TQ
            _store_final(O, LSE, tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32),
                         tl.full([BLOCK_M], float("-inf"), tl.float32), tl.full([BLOCK_M], 0.0, tl.float32),
                         b * sob, b * slb, head * soh + tok * sot, head * slh + tok, row_ok,
                         BLOCK_D, HEAD_DIM)


# Whether TRITON_INTERPRET was set when this module was imported: kernels then run on CPU tensors.
INTERPRETED = not isinstance(_decode_kernel, triton.runtime.JITFunction)


def block_sizes(head_dim: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) for a head dim and rows = query heads per kv head x Tq.

    tl.dot needs every block dim >= 16. Rows beyond BLOCK_M go to further row groups, which
    re-read K/V; BLOCK_M is capped so the fp32 accumulator fits in registers.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(max(16, triton.next_power_of_2(rows)), 64 if block_d <= 128 else 32)
    block_n = 64 if block_d <= 128 else 32
    return block_m, block_n, block_d


class _CounterPool:
    """Arrival counters, zero between calls (the last arriver resets its own), one per stream."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, n: int, device: torch.device) -> torch.Tensor:
        if device.type != "cuda":
            return torch.zeros(n, dtype=torch.int32, device=device)
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
            self._buffers[key] = buf
        return buf


_COUNTERS = _CounterPool()


def tile_starts(lens: torch.Tensor, n_kv_heads: int, n_row_groups: int, block_n: int) -> torch.Tensor:
    """Start of each segment on the line of tiles, plus the total at the end (int32, on device)."""
    tiles = (lens + (block_n - 1)) // block_n
    per_segment = tiles.repeat_interleave(n_kv_heads * n_row_groups)
    starts = torch.zeros(per_segment.numel() + 1, dtype=torch.int32, device=lens.device)
    torch.cumsum(per_segment, 0, out=starts[1:])
    return starts


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, visible: torch.Tensor,
           scale: float, schedule: str, num_programs: int):
    """Run the kernel. Inputs are validated by the caller (decode.py).

    lens: (B,) int32 in [0, T], keys present in the cache; visible: (B,) int32, lens plus the
    keys that follow this cache elsewhere (sequence parallel), for the causal bound.
    schedule "streamk": num_programs programs. "splitk": num_programs is spread over the
    segments as a fixed number of splits each. Returns (o like q, lse float32 (B, Hq, Tq)).
    """
    B, Hq, Tq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_m, block_n, block_d = block_sizes(D, G * Tq)
    n_row_groups = triton.cdiv(G * Tq, block_m)
    n_segments = B * Hkv * n_row_groups
    starts = tile_starts(lens, Hkv, n_row_groups, block_n)

    if schedule == "streamk":
        grid_size, num_splits, tiles_per_split = num_programs, 1, 1
    elif schedule == "splitk":
        max_tiles = triton.cdiv(T, block_n)
        num_splits = max(1, min(max_tiles, triton.cdiv(num_programs, n_segments)))
        tiles_per_split = triton.cdiv(max_tiles, num_splits)
        num_splits = triton.cdiv(max_tiles, tiles_per_split)
        grid_size = n_segments * num_splits
    else:
        raise ValueError(f"decode_triton.decode: schedule={schedule!r}; expected 'streamk' or 'splitk'")

    o = torch.empty((B, Hq, Tq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, Tq), dtype=torch.float32, device=q.device)
    acc_ws = torch.empty((grid_size * 2, block_m, block_d), dtype=torch.float32, device=q.device)
    ml_ws = torch.empty((grid_size * 2, 2, block_m), dtype=torch.float32, device=q.device)
    counters = _COUNTERS.get(n_segments, q.device)

    _decode_kernel[(grid_size,)](
        q, k, v, o, lse, lens, visible, starts, acc_ws, ml_ws, counters,
        *q.stride(), *k.stride(), *v.stride(), o.stride(0), o.stride(1), o.stride(2),
        lse.stride(0), lse.stride(1),
        Hkv, n_row_groups, n_segments, grid_size, num_splits, tiles_per_split, scale * LOG2E,
        G=G, TQ=Tq, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        SPLITK=schedule == "splitk",
        # Triton's interpreter multiplies bf16 tensors in tl.dot as raw 16-bit integers: give it
        # float32 copies (exact for bf16 values, so the numbers match the tensor cores').
        DOT_FP32=INTERPRETED and q.dtype == torch.bfloat16,
        num_warps=4, num_stages=num_stages(q.dtype),
    )
    return o, lse


def num_stages(dtype: torch.dtype) -> int:
    """Software-pipeline depth of the K/V loads: 3 for 16-bit caches; 2 for fp32, whose tiles are
    twice as big, so that head_dim 256 still fits an A100's shared memory."""
    return 3 if dtype.itemsize == 2 else 2


def default_num_programs(device: torch.device) -> int:
    """Two programs per SM on CUDA (a persistent grid); 8 under the CPU interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8

