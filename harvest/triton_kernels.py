"""The TRITON backend's two kernels (driven by kernels.py, which imports this module only where Triton is there).

`fused_pass` reads a layer's [batch, tokens, units] activations once: a program per context and block of units
walks the context's tokens in tiles, keeping each unit's max and min with the first counted position reaching
them, the counted tokens' sum, sum of squares and firing count, and counting a sampled context's tokens into the
histogram. Its last step compares each context's max (and minus its min) with its unit's k-th kept score, read
on the device, and appends the contexts that beat it to the unit's short list of candidates.

`merge_samples` runs a program per unit for each sample (quantile intervals, random): W grows with the unit's max,
re-binning the kept entries in place, then the batch's contexts that fire and beat their bin's largest kept key
are ranked as reservoir.py's tensor code ranks them, and each entering one takes the slot of a kept one it pushes
out, its tokens' activations copied. `merge_candidates` runs a program per unit that returns at once unless the
unit has candidates: it ranks
them against the kept list and each other exactly as topk.py's tensor merge does (a higher score first; a tie
goes to the kept context, then to the lower batch row), moves the kept contexts down, writes the entering ones
in their slots and copies their tokens' activations. Nothing is read back by the host, so a CUDA graph can
replay both. Both kernels also run under Triton's interpreter (TRITON_INTERPRET=1, read when this module is
imported), which is how the CPU tests check them against the tensor code.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def histogram_column(x, BF16: tl.constexpr, HALF: tl.constexpr, FIRST_CODE: tl.constexpr):
    """statistics.histogram_columns: the column of each value, from its sign, exponent and top mantissa bits."""
    if BF16:  # bfloat16 is the top half of a float32: the same code, 16 bits further right
        raw = (x.to(tl.int16, bitcast=True) >> 5).to(tl.int32)
    else:
        raw = x.to(tl.float32).to(tl.int32, bitcast=True) >> 21
    code = raw & 1023
    magnitude = tl.where(code == 0, 0, tl.minimum(tl.maximum(code - FIRST_CODE, 1), HALF))
    return HALF + tl.where(raw < 0, -magnitude, magnitude)


@triton.jit
def fused_pass(acts, stride_b, stride_t, stride_u, counted, keys, every,
               context_max, context_min, max_at, min_at, partial, counts,
               top_values, top_count, top_rows, bottom_values, bottom_count, bottom_rows,
               batch, tokens, units, top_k, bottom_k,
               BF16: tl.constexpr, BOTTOM: tl.constexpr, SPARSE: tl.constexpr, HALF: tl.constexpr,
               FIRST_CODE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_U: tl.constexpr):
    """One program per (context b, block of units). Writes context_max/min and max_at/min_at [batch, units],
    partial [3, batch, units] (sum, sum of squares, firing count: float32), adds the histogram into counts
    [2 * HALF + 2, units] (int64; the last row takes uncounted positions, as the tensor code's does) when b's key
    is a multiple of every, and appends b to top_rows[u] (and bottom_rows[u]) where it is a candidate. SPARSE
    (dictionary features, as the sparse tensor code keeps them): the histogram counts only counted non-zeros
    (the zeros are implied by the token count), and only a context where the unit fires (max > 0) is a
    candidate."""
    b = tl.program_id(0).to(tl.int64)
    unit = tl.program_id(1).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)
    in_layer = unit < units
    high = tl.full([BLOCK_U], float("-inf"), tl.float32)
    low = tl.full([BLOCK_U], float("inf"), tl.float32)
    high_at = tl.zeros([BLOCK_U], tl.int32)
    low_at = tl.zeros([BLOCK_U], tl.int32)
    nan = tl.zeros([BLOCK_U], tl.int32)
    total = tl.zeros([BLOCK_U], tl.float32)
    squares = tl.zeros([BLOCK_U], tl.float32)
    firing = tl.zeros([BLOCK_U], tl.float32)
    sampled = tl.load(keys + b) % every == 0
    row = acts + b * stride_b
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        in_context = t < tokens
        keep = (tl.load(counted + b * tokens + t, mask=in_context, other=0) != 0)[:, None] & in_layer[None, :]
        raw = tl.load(row + t[:, None].to(tl.int64) * stride_t + unit[None, :] * stride_u,
                      mask=in_context[:, None] & in_layer[None, :], other=0.0)
        x = raw.to(tl.float32)
        is_nan = x != x
        nan = tl.maximum(nan, tl.max(tl.where(keep & is_nan, 1, 0), axis=0))
        # Extremes without NaN (recorded apart): a tile's max, the first of its positions reaching it, and
        # the earlier tile's kept on a tie
        above = tl.where(keep & ~is_nan, x, float("-inf"))
        tile_high = tl.max(above, axis=0)
        tile_high_at = tl.min(tl.where(keep & (above == tile_high[None, :]), t[:, None], tokens), axis=0)
        higher = tile_high > high
        high, high_at = tl.where(higher, tile_high, high), tl.where(higher, tile_high_at, high_at)
        below = tl.where(keep & ~is_nan, x, float("inf"))
        tile_low = tl.min(below, axis=0)
        tile_low_at = tl.min(tl.where(keep & (below == tile_low[None, :]), t[:, None], tokens), axis=0)
        lower = tile_low < low
        low, low_at = tl.where(lower, tile_low, low), tl.where(lower, tile_low_at, low_at)
        value = tl.where(keep, x, 0.0)
        total += tl.sum(value, axis=0)
        squares += tl.sum(value * value, axis=0)
        firing += tl.sum(tl.where(value > 0, 1.0, 0.0), axis=0)
        if SPARSE:  # every context, non-zeros alone: a token fires a few features of thousands
            column = histogram_column(raw, BF16, HALF, FIRST_CODE)
            tl.atomic_add(counts + column.to(tl.int64) * units + unit[None, :], tl.full(column.shape, 1, tl.int64),
                          mask=keep & (x != 0))
        elif sampled:
            column = tl.where(keep, histogram_column(raw, BF16, HALF, FIRST_CODE), 2 * HALF + 1)
            tl.atomic_add(counts + column.to(tl.int64) * units + unit[None, :], tl.full(column.shape, 1, tl.int64),
                          mask=in_context[:, None] & in_layer[None, :])
    # a NaN among a context's counted tokens makes its max and min NaN, as torch's amax and amin do
    high = tl.where(nan > 0, float("nan"), high)
    low = tl.where(nan > 0, float("nan"), low)
    out = b * units + unit
    tl.store(context_max + out, high, mask=in_layer)
    tl.store(context_min + out, low, mask=in_layer)
    tl.store(max_at + out, high_at, mask=in_layer)
    tl.store(min_at + out, low_at, mask=in_layer)
    tl.store(partial + out, total, mask=in_layer)
    tl.store(partial + batch * units + out, squares, mask=in_layer)
    tl.store(partial + 2 * batch * units + out, firing, mask=in_layer)
    # Candidates: only a context beating its unit's k-th score can enter (a tie loses to the kept context, whose
    # id is lower); NaN never does; a sparse unit's only where it fires
    enters = in_layer & (high > tl.load(top_values + unit * top_k + top_k - 1, mask=in_layer, other=float("inf")))
    if SPARSE:
        enters = enters & (high > 0)
    slot = tl.atomic_add(top_count + unit, 1, mask=enters)
    tl.store(top_rows + unit * batch + slot, b.to(tl.int32), mask=enters & (slot < batch))  # (a batch at most)
    if BOTTOM:
        enters = in_layer & (-low > tl.load(bottom_values + unit * bottom_k + bottom_k - 1, mask=in_layer,
                                            other=float("inf")))
        slot = tl.atomic_add(bottom_count + unit, 1, mask=enters)
        tl.store(bottom_rows + unit * batch + slot, b.to(tl.int32), mask=enters & (slot < batch))


@triton.jit
def merge_candidates(scores, at, count, candidate_rows, context_ids_in, acts, stride_b, stride_t, stride_u,
                     values, context_ids, positions, slots, slot_activations,
                     batch, tokens, units, k, width,
                     NEGATE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
                     CHUNK: tl.constexpr):
    """One program per unit u: its count[u] candidate rows (candidate_rows[u, :count[u]], any order) merged into
    the list [u, :k] in place, as TopK._merge does; scores/at [batch, units]: each context's max (or min, negated:
    NEGATE) and the first position reaching it. count[u] goes back to 0 for the next batch."""
    u = tl.program_id(0).to(tl.int64)
    n = tl.minimum(tl.load(count + u), batch)  # never more rows than were written
    if n > 0:
        tl.store(count + u, 0)
        c = tl.arange(0, BLOCK_B)
        is_candidate = c < n
        rows = tl.load(candidate_rows + u * batch + c, mask=is_candidate, other=0).to(tl.int64)
        score = tl.load(scores + rows * units + u, mask=is_candidate, other=0.0)
        if NEGATE:
            score = -score
        j = tl.arange(0, BLOCK_K)
        in_list = j < k
        kept = tl.load(values + u * k + j, mask=in_list, other=float("-inf"))
        # A candidate's rank: kept contexts scoring at least as much, and candidates above it (a higher score,
        # or the same in a lower row); contexts that are not candidates score below every candidate
        among_kept = tl.sum(tl.where(in_list[None, :] & (kept[None, :] >= score[:, None]), 1, 0), axis=1)
        among_batch = tl.zeros([BLOCK_B], tl.int32)
        for c0 in range(0, n, CHUNK):
            o = c0 + tl.arange(0, CHUNK)
            is_other = o < n
            other_rows = tl.load(candidate_rows + u * batch + o, mask=is_other, other=0).to(tl.int64)
            other = tl.load(scores + other_rows * units + u, mask=is_other, other=0.0)
            if NEGATE:
                other = -other
            tied = (other[None, :] == score[:, None]) & (other_rows[None, :] < rows[:, None])
            ahead_of = is_other[None, :] & ((other[None, :] > score[:, None]) | tied)
            among_batch += tl.sum(tl.where(ahead_of, 1, 0), axis=1)
        rank = among_kept + among_batch
        enters = is_candidate & (rank < k)
        n_entering = tl.sum(tl.where(enters, 1, 0), axis=0)
        # Kept context j moves down by the entering ones scoring above it, dropping out past k - 1; the entering
        # ones take the slots of the last n_entering, best first
        moved = j + tl.sum(tl.where(enters[None, :] & (among_kept[None, :] <= j[:, None]), 1, 0), axis=1)
        kept_ids = tl.load(context_ids + u * k + j, mask=in_list, other=0)
        kept_positions = tl.load(positions + u * k + j, mask=in_list, other=0)
        kept_slots = tl.load(slots + u * k + j, mask=in_list, other=0)
        new_slots = tl.load(slots + u * k + k - n_entering + among_batch, mask=enters, other=0)
        tl.debug_barrier()  # every thread has read the old list before any writes it
        stays = in_list & (moved < k)
        tl.store(values + u * k + moved, kept, mask=stays)
        tl.store(context_ids + u * k + moved, kept_ids, mask=stays)
        tl.store(positions + u * k + moved, kept_positions, mask=stays)
        tl.store(slots + u * k + moved, kept_slots, mask=stays)
        tl.store(values + u * k + rank, score, mask=enters)
        tl.store(context_ids + u * k + rank, tl.load(context_ids_in + rows, mask=enters, other=0), mask=enters)
        tl.store(positions + u * k + rank, tl.load(at + rows * units + u, mask=enters, other=0).to(tl.int64),
                 mask=enters)
        tl.store(slots + u * k + rank, new_slots, mask=enters)
        # The entering contexts' activations, one row each (zero past the batch's tokens)
        w = tl.arange(0, BLOCK_W)
        for i in range(0, n_entering):
            hit = enters & (among_batch == i)
            row = tl.sum(tl.where(hit, rows, 0), axis=0)
            slot = tl.sum(tl.where(hit, new_slots, 0), axis=0)
            tokens_of = tl.load(acts + row * stride_b + w.to(tl.int64) * stride_t + u * stride_u, mask=w < tokens,
                                other=0.0)
            tl.store(slot_activations + (u * k + slot) * width + w,
                     tokens_of.to(slot_activations.dtype.element_ty), mask=w < width)


@triton.jit
def frexp_exponent(x):
    """torch.frexp's exponent of a float32 x > 0 (x = m * 2^e, 0.5 <= m < 1; subnormals too; 0 for infinity)."""
    small = x < 1.1754943508222875e-38  # subnormal: scaled by 2^64 into the normals first
    y = tl.where(small, x * 18446744073709551616.0, x)
    biased = ((y.to(tl.int32, bitcast=True) >> 23) & 255).to(tl.int64)
    return tl.where(biased == 255, 0, biased - 126 - tl.where(small, 64, 0))


@triton.jit
def power_of_two(exponent):
    """2.0^exponent as float32 from its bits (exponent within [-126, 127]), as reservoir._power_of_two."""
    return ((exponent + 127) << 23).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def merge_samples(context_max, max_at, batch_keys, batch_ids, acts, stride_b, stride_t, stride_u,
                  exponent, keys, context_ids, positions, values, activations,
                  batch, tokens, units, width,
                  N_BINS: tl.constexpr, PER: tl.constexpr, SPARSE: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_W: tl.constexpr, CHUNK: tl.constexpr,
                  ROWS: tl.constexpr):
    """One program per unit u: Reservoir.update for its samples (N_BINS bins of PER entries, [u, :, :] of each
    state tensor), from context_max/max_at [batch, units] (each context's max, NaN where one is, and the first
    position reaching it). W grows first (kept entries re-binned in place), then the batch's candidates (firing,
    with a key below their bin's largest kept key) are ranked among the kept keys and each other; an entering
    context takes the slot of a kept one it displaces (within a bin the order of entries is free)."""
    u = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    in_batch = b < batch
    x = tl.load(context_max + b * units + u, mask=in_batch, other=float("-inf"))
    e = tl.arange(0, BLOCK_E)
    in_state = e < N_BINS * PER
    state = u * N_BINS * PER
    w = tl.arange(0, BLOCK_W)
    if N_BINS > 1:
        # W: the smallest power of two above the unit's max. A dense unit's grows not at all while a NaN is in
        # the batch, as amax gives; a sparse unit's follows the contexts that fire, which a NaN context does not
        has_nan = tl.max(tl.where(in_batch & (x != x), 0 if SPARSE else 1, 0), axis=0) > 0
        batch_max = tl.max(tl.where(x != x, float("-inf"), x), axis=0)
        needed = tl.where(~has_nan & (batch_max > 0), frexp_exponent(batch_max), -(1 << 20))
        old = tl.load(exponent + u)
        if needed > old:
            tl.store(exponent + u, needed)
            if old != -(1 << 20):
                # d doublings merge bins in pairs d times: new bin i keeps the PER smallest keys of old bins
                # [i * 2^d, (i + 1) * 2^d), kept here in slot order, so each row moves down or stays
                d = tl.minimum(needed - old, 16)
                old_keys = tl.load(keys + state + e, mask=in_state, other=0x7FFFFFFFFFFFFFFF)
                ids = tl.load(context_ids + state + e, mask=in_state, other=-1)
                at = tl.load(positions + state + e, mask=in_state, other=0)
                value = tl.load(values + state + e, mask=in_state, other=0.0)
                new_bin = (e // PER).to(tl.int64) >> d
                together = (new_bin[:, None] == new_bin[None, :]) & in_state[None, :]
                chosen = in_state & (tl.sum(tl.where(together & ahead_of(old_keys, e), 1, 0), axis=1) < PER)
                order = tl.sum(tl.where(together & chosen[None, :] & (e[None, :] < e[:, None]), 1, 0), axis=1)
                to = new_bin * PER + order
                n_kept = ((N_BINS - 1) >> d) * PER + PER  # the slots of the bins that have any source
                tl.debug_barrier()
                tl.store(keys + state + to, old_keys, mask=chosen)
                tl.store(context_ids + state + to, ids, mask=chosen)
                tl.store(positions + state + to, at, mask=chosen)
                tl.store(values + state + to, value, mask=chosen)
                emptied = in_state & (e >= n_kept)
                tl.store(keys + state + e, tl.full([BLOCK_E], 0x7FFFFFFFFFFFFFFF, tl.int64), mask=emptied)
                tl.store(context_ids + state + e, tl.full([BLOCK_E], -1, tl.int64), mask=emptied)
                tl.store(positions + state + e, tl.zeros([BLOCK_E], tl.int64), mask=emptied)
                tl.store(values + state + e, tl.zeros([BLOCK_E], tl.float32), mask=emptied)
                # rows in blocks of ROWS, each block read whole before it is written (a later block's sources
                # lie above every slot written before it); then the emptied bins' rows are zeroed
                for r0 in range(0, N_BINS * PER, ROWS):
                    r = r0 + tl.arange(0, ROWS)
                    source = tl.sum(tl.where(chosen[None, :] & (to[None, :] == r[:, None]), e[None, :], 0), axis=1)
                    move = (r < n_kept) & (source != r)
                    cells = (state + r.to(tl.int64))[:, None] * width + w[None, :]
                    inside = (w < width)[None, :] & (r < N_BINS * PER)[:, None]
                    row = tl.load(activations + (state + source.to(tl.int64))[:, None] * width + w[None, :],
                                  mask=move[:, None] & inside, other=0.0)
                    tl.debug_barrier()
                    tl.store(activations + cells, row, mask=(move | (r >= n_kept))[:, None] & inside)
                    tl.debug_barrier()
        tl.debug_barrier()
    # Each context's bin's kept keys [contexts, PER] are read from memory (cached) rather than compared against
    # every entry in registers, where a [contexts x entries] matrix of int64 keys would not fit
    p = tl.arange(0, BLOCK_P)
    in_place = p < PER
    key = tl.load(batch_keys + b, mask=in_batch, other=0)
    bin = sample_bin(x, tl.load(exponent + u), N_BINS)
    bin_keys = tl.load(keys + state + bin[:, None] * PER + p[None, :], mask=in_batch[:, None] & in_place[None, :],
                       other=-1)
    # a candidate fires and beats the largest kept key of its bin
    worst = tl.max(bin_keys, axis=1)
    candidate = in_batch & (x > 0) & (key < worst)
    if tl.sum(tl.where(candidate, 1, 0), axis=0) > 0:
        among_kept = tl.sum(tl.where(in_place[None, :] & (bin_keys < key[:, None]), 1, 0), axis=1)
        among_batch = tl.zeros([BLOCK_B], tl.int32)
        for o0 in range(0, batch, CHUNK):
            o = o0 + tl.arange(0, CHUNK)
            is_other = o < batch
            other_x = tl.load(context_max + o * units + u, mask=is_other, other=float("-inf"))
            other_key = tl.load(batch_keys + o, mask=is_other, other=0)
            other_bin = sample_bin(other_x, tl.load(exponent + u), N_BINS)
            other_worst = tl.max(tl.load(keys + state + other_bin[:, None] * PER + p[None, :],
                                         mask=is_other[:, None] & in_place[None, :], other=-1), axis=1)
            other_candidate = is_other & (other_x > 0) & (other_key < other_worst)
            smaller = (other_key[None, :] < key[:, None]) | ((other_key[None, :] == key[:, None]) &
                                                             (o[None, :] < b[:, None]))
            ahead = (other_bin[None, :] == bin[:, None]) & other_candidate[None, :] & smaller
            among_batch += tl.sum(tl.where(ahead, 1, 0), axis=1)
        enters = candidate & (among_kept + among_batch < PER)
        # The entering ones of a bin are its candidates of smallest keys (among_batch 0, 1, ...); the kept ones
        # they push out are its largest keys: the one of kept rank PER - 1 - among_batch makes room
        kept = tl.load(keys + state + e, mask=in_state, other=0x7FFFFFFFFFFFFFFF)
        kept_bin = e // PER
        peer = kept_bin[:, None] * PER + p[None, :]  # [entries, PER]: the entries of each one's bin
        peer_keys = tl.load(keys + state + peer, mask=in_state[:, None] & in_place[None, :], other=0)
        ahead = (peer_keys < kept[:, None]) | ((peer_keys == kept[:, None]) & (peer < e[:, None]))
        kept_rank = tl.sum(tl.where(in_place[None, :] & ahead, 1, 0), axis=1)
        makes_room = ((kept_bin[None, :] == bin.to(tl.int32)[:, None]) & in_state[None, :]
                      & (kept_rank[None, :] == (PER - 1 - among_batch)[:, None]))
        slot = tl.sum(tl.where(makes_room, e[None, :], 0), axis=1)
        tl.debug_barrier()  # every thread has read the kept keys before any is replaced
        tl.store(keys + state + slot, key, mask=enters)
        tl.store(context_ids + state + slot, tl.load(batch_ids + b, mask=enters, other=0), mask=enters)
        tl.store(positions + state + slot, tl.load(max_at + b * units + u, mask=enters, other=0).to(tl.int64),
                 mask=enters)
        tl.store(values + state + slot, x, mask=enters)
        for r0 in range(0, N_BINS * PER, ROWS):  # the entering contexts' rows, into the slots they took
            r = r0 + tl.arange(0, ROWS)
            hit = enters[None, :] & (slot[None, :] == r[:, None])  # [ROWS, BLOCK_B]
            taken = tl.sum(tl.where(hit, 1, 0), axis=1) > 0
            row = tl.sum(tl.where(hit, b[None, :], 0), axis=1).to(tl.int64)
            inside = taken[:, None] & (w < width)[None, :]
            tokens_of = tl.load(acts + row[:, None] * stride_b + w[None, :].to(tl.int64) * stride_t + u * stride_u,
                                mask=inside & (w < tokens)[None, :], other=0.0)
            tl.store(activations + (state + r.to(tl.int64))[:, None] * width + w[None, :],
                     tokens_of.to(activations.dtype.element_ty), mask=inside)


@triton.jit
def ahead_of(key, index):
    """[n, n]: whether entry i (column) comes before entry j (row): a smaller key, or the same at a lower index."""
    return (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (index[None, :] < index[:, None]))


@triton.jit
def sample_bin(x, exponent, N_BINS: tl.constexpr):
    """reservoir._bin: each context max's interval under W = 2^exponent (NaN and anything at or below 0: bin 0)."""
    if N_BINS > 1:
        scale = tl.minimum(-exponent, 126)  # never-fired units: finite
        half = scale >> 1  # floor division
        scaled = x * power_of_two(half) * power_of_two(scale - half)
        y = tl.floor(scaled * N_BINS)
        y = tl.where(y != y, 0.0, y)
        return tl.minimum(tl.maximum(y, 0.0), N_BINS - 1).to(tl.int64)
    else:
        return tl.zeros(x.shape, tl.int64)
