"""Link kernels: parent assignment, incremental upward aggregation, CSR, downward broadcast.

Terms: ``parent_row[c]`` is child ``c``'s parent row (-1 = none). A tick's dirty children are
``dirty[0:m]``; ``old_parent[j]`` holds child ``dirty[j]``'s parent as it was before the tick
touched it. Aggregates are kept by removing each dirty child's old contribution and adding its
new one (the loop is generated per link, see ``vecswim.codegen``, from ``fixed`` and the
min/max rules here), so a tick costs O(dirty children), whatever the fan-in.

Children of a parent (for min/max recompute and broadcast) are a CSR built at the last
compaction plus per-parent linked lists of edges added since (``delta_head``/``delta_next``/
``delta_child``). An entry (p, c) is valid only while ``parent_row[c] == p``; stale entries
are skipped, and a child listed twice is harmless because every user is idempotent.
"""

import numpy as np
from numba import njit
from vecswim.kernels.prefetch import prefetch


@njit(cache=True)
def assign_parent(rows, prow, parent_row, track, delta_head, delta_next, delta_child, n_delta):
    """Set ``parent_row[rows[i]] = prow[i]`` in arrival order; record changed edges.

    With ``track`` the new edge (p, c) is pushed on p's delta list. Caller guarantees
    ``len(delta_next) >= n_delta + len(rows)``. Returns the new delta count.
    """
    for i in range(len(rows)):
        c = rows[i]
        p = prow[i]
        if parent_row[c] != p:
            parent_row[c] = p
            if track and p >= 0:
                delta_child[n_delta] = c
                delta_next[n_delta] = delta_head[p]
                delta_head[p] = n_delta
                n_delta += 1
    return n_delta


@njit(cache=True)
def fixed(v, scale):
    """A value's exact contribution to a sum: ``rint(v * scale)`` for floats (fixed point),
    the value itself for integers (``scale == 0``), saturated to the int64 range. Int64
    additions and subtractions of these (wrapping) never drift: after any history a parent's
    accumulator equals the from-scratch sum modulo 2**64."""
    if scale == 0.0:
        return np.int64(v)
    x = np.rint(np.float64(v) * scale)
    # beyond the int64 range the contribution saturates (still the same for add and remove)
    if x >= 9.223372036854775807e18:
        return np.int64(9223372036854775807)
    if x < -9.223372036854775807e18:
        return np.int64(-9223372036854775807 - 1)
    return np.int64(x)


@njit(cache=True, nogil=True)
def recompute_extreme(
    parents,
    indptr,
    children,
    delta_head,
    delta_next,
    delta_child,
    parent_row,
    cur,
    ext,
    ties,
    sign,
):
    """ext[p] = max (sign=1) / min (sign=-1) over p's current children with a finite value,
    each taken as ``ext``'s dtype holds it (NaN if none), and ties[p] = how many distinct
    children hold it, for each p in ``parents``.

    One pass over p's CSR segment (children sorted ascending, each at most once) plus p's
    delta list; a delta child also valid in the CSR segment (it moved away and back) or listed
    twice is counted once. O(children of those parents); returns the entries visited.
    """
    n_csr = len(indptr) - 1
    visited = 0
    held = np.empty(1, ext.dtype)  # a child's value as the parent column holds it
    for k in range(len(parents)):
        p = parents[k]
        best = np.nan
        n_best = 0
        lo = hi = 0
        if p < n_csr:
            lo = indptr[p]
            hi = indptr[p + 1]
            visited += hi - lo
            for e in range(lo, hi):
                if e + 16 < hi:
                    ca = children[e + 16]
                    prefetch(parent_row, ca)
                    prefetch(cur, ca)
                c = children[e]
                if parent_row[c] == p and np.isfinite(np.float64(cur[c])):
                    held[0] = cur[c]
                    v = np.float64(held[0])
                    if best != best or sign * v > sign * best:
                        best = v
                        n_best = 1
                    elif v == best:
                        n_best += 1
        extra = 0
        e = delta_head[p]
        while e >= 0:
            extra += 1
            e = delta_next[e]
        visited += extra
        if extra:
            found = np.empty(extra, np.int32)
            n_found = 0
            e = delta_head[p]
            while e >= 0:
                c = delta_child[e]
                if parent_row[c] == p:
                    at = lo + np.searchsorted(children[lo:hi], c)
                    if not (at < hi and children[at] == c):
                        found[n_found] = c
                        n_found += 1
                e = delta_next[e]
            for c in np.unique(found[:n_found]):
                if np.isfinite(np.float64(cur[c])):
                    held[0] = cur[c]
                    v = np.float64(held[0])
                    if best != best or sign * v > sign * best:
                        best = v
                        n_best = 1
                    elif v == best:
                        n_best += 1
        ext[p] = best
        ties[p] = n_best
    return visited


@njit(cache=True)
def build_csr(parent_row, n_children, n_parents):
    """Counting sort of children by parent: returns (indptr int64[n_parents+1], children int32).

    O(n_children + n_parents); used at compaction, amortized over the edge deltas it absorbs.
    """
    indptr = np.zeros(n_parents + 1, np.int64)
    for c in range(n_children):
        p = parent_row[c]
        if p >= 0:
            indptr[p + 1] += 1
    for p in range(n_parents):
        indptr[p + 1] += indptr[p]
    fill = indptr[:-1].copy()
    children = np.empty(indptr[n_parents], np.int32)
    for c in range(n_children):
        p = parent_row[c]
        if p >= 0:
            children[fill[p]] = c
            fill[p] += 1
    return indptr, children


@njit(cache=True, inline="always")
def _differs(a, b):
    return a != b and (a == a or b == b)


@njit(cache=True)
def broadcast_push(
    pdirty,
    n_pdirty,
    n_snapped,
    old_src,
    src,
    indptr,
    children,
    delta_head,
    delta_next,
    delta_child,
    parent_row,
    dst,
    cstamp,
    tick,
    cdirty,
    n_cdirty,
):
    """Copy ``src[p]`` into ``dst[c]`` for the children of every dirty parent whose ``src``
    changed this tick (``old_src[j]`` is parent ``pdirty[j]``'s value before the tick; parents
    past ``n_snapped`` were dirtied by a broadcast from above, have no such value and always push).
    Children whose value changed are marked dirty (``cdirty`` must have room for all of
    them). Returns (new child dirty count, child entries visited). O(children of changed
    parents).
    """
    n_csr = len(indptr) - 1
    visited = 0
    for j in range(n_pdirty):
        p = pdirty[j]
        v = src[p]
        if j < n_snapped and not _differs(old_src[j], v):
            continue
        if p < n_csr:
            visited += indptr[p + 1] - indptr[p]
            for e in range(indptr[p], indptr[p + 1]):
                c = children[e]
                if parent_row[c] == p and _differs(dst[c], v):
                    dst[c] = v
                    if cstamp[c] != tick:
                        cstamp[c] = tick
                        cdirty[n_cdirty] = c
                        n_cdirty += 1
        e = delta_head[p]
        while e >= 0:
            visited += 1
            c = delta_child[e]
            if parent_row[c] == p and _differs(dst[c], v):
                dst[c] = v
                if cstamp[c] != tick:
                    cstamp[c] = tick
                    cdirty[n_cdirty] = c
                    n_cdirty += 1
            e = delta_next[e]
    return n_cdirty, visited


@njit(cache=True)
def broadcast_pull(dirty, m, old_parent, parent_row, src, dst, initial):
    """Children that changed parent this tick take their new parent's ``src`` value
    (``initial`` when they have none). They are already dirty."""
    for j in range(m):
        c = dirty[j]
        pn = parent_row[c]
        if pn != old_parent[j]:
            dst[c] = src[pn] if pn >= 0 else initial
