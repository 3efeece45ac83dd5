"""Byte-level kernels for the decoder (``vecswim.decode``): JSON framing and number text.

``scan_json_items`` checks, for every item (a Pulsar payload or an NDJSON line), that it holds
exactly one JSON object and nothing else, before Arrow parses the good items in bulk: so every
good item becomes exactly one row, by construction. ``parse_number_text`` classifies strings
by the JSON number grammar and reads integer literals exactly (never through a double).
"""

import numpy as np
from numba import njit

# scan_json_items status codes
OK = 0
EMPTY = 1  # empty or only whitespace
NOT_OBJECT = 2  # first value is not an object (array, scalar, garbage)
MULTIPLE = 3  # something follows the first value
TRUNCATED = 4  # input ends inside the value
BAD_UTF8 = 5  # invalid UTF-8
CONTROL = 6  # raw control character inside a string

# parse_number_text classes
INT = 0  # integer literal within int64
INT_OVERFLOW = 1  # integer literal outside int64
FLOAT = 2  # literal with a fraction or an exponent
NOT_NUMBER = 3

_INT64_MAX = np.frombuffer(b"9223372036854775807", np.uint8)
_INT64_MIN = np.frombuffer(b"9223372036854775808", np.uint8)


@njit(cache=True, nogil=True)
def _utf8_len(data, i, end):
    """Length of the valid UTF-8 sequence starting with the non-ASCII byte ``data[i]``, or 0
    (overlong forms, surrogates and code points above U+10FFFF are invalid)."""
    b = data[i]
    if 0xC2 <= b <= 0xDF:
        n = 2
        lo, hi = 0x80, 0xBF
    elif b == 0xE0:
        n = 3
        lo, hi = 0xA0, 0xBF
    elif 0xE1 <= b <= 0xEC or 0xEE <= b <= 0xEF:
        n = 3
        lo, hi = 0x80, 0xBF
    elif b == 0xED:
        n = 3
        lo, hi = 0x80, 0x9F
    elif b == 0xF0:
        n = 4
        lo, hi = 0x90, 0xBF
    elif 0xF1 <= b <= 0xF3:
        n = 4
        lo, hi = 0x80, 0xBF
    elif b == 0xF4:
        n = 4
        lo, hi = 0x80, 0x8F
    else:
        return 0
    if i + n > end:
        return 0
    c = data[i + 1]
    if c < lo or c > hi:
        return 0
    for k in range(2, n):
        c = data[i + k]
        if c < 0x80 or c > 0xBF:
            return 0
    return n


@njit(cache=True, nogil=True)
def scan_json_items(data, starts, ends, out, out_starts, status):
    """For each item ``data[starts[i]:ends[i]]`` set ``status[i]`` (codes above) and copy the
    OK items to ``out``, one per line (``\\n`` after each; raw CR/LF inside an item, which
    valid JSON allows only as whitespace, become spaces). ``out_starts[j]`` is where good item
    ``j`` begins. ``out`` needs ``sum(lengths) + n`` bytes. Returns (good items, bytes used).

    Framing only: brackets are counted outside strings (any kind), strings and escapes are
    tracked, UTF-8 is validated. The syntax inside the object is left to the JSON parser."""
    n_good = 0
    pos = 0
    for i in range(len(starts)):
        s = starts[i]
        e = ends[i]
        begin = pos
        st = OK
        depth = 0
        in_str = False
        esc = False
        done = False  # the first value is closed
        seen = False  # a non-whitespace byte was seen
        j = s
        while j < e:
            b = data[j]
            if b >= 0x80:
                k = _utf8_len(data, j, e)
                if k == 0:
                    st = BAD_UTF8
                    break
                if done:
                    st = MULTIPLE
                    break
                if not seen:
                    st = NOT_OBJECT
                    break
                for q in range(k):
                    out[pos + q] = data[j + q]
                pos += k
                esc = False
                j += k
                continue
            if in_str:
                if b < 0x20:
                    st = CONTROL
                    break
                if esc:
                    esc = False
                elif b == 0x5C:  # backslash
                    esc = True
                elif b == 0x22:  # quote
                    in_str = False
                out[pos] = b
                pos += 1
                j += 1
                continue
            if b == 0x20 or b == 0x09 or b == 0x0A or b == 0x0D:
                out[pos] = 0x20
                pos += 1
                j += 1
                continue
            if done:
                st = MULTIPLE
                break
            if not seen:
                seen = True
                if b != 0x7B:  # {
                    st = NOT_OBJECT
                    break
            if b == 0x22:
                in_str = True
            elif b == 0x7B or b == 0x5B:
                depth += 1
            elif b == 0x7D or b == 0x5D:
                depth -= 1
                if depth == 0:
                    done = True
            out[pos] = b
            pos += 1
            j += 1
        if st == OK:
            if not seen:
                st = EMPTY
            elif not done:
                st = TRUNCATED
        status[i] = st
        if st == OK:
            out[pos] = 0x0A
            pos += 1
            out_starts[n_good] = begin
            n_good += 1
        else:
            pos = begin
    return n_good, pos


@njit(cache=True, nogil=True)
def parse_number_text(data, offsets, valid, cls, value):
    """Classify string ``i`` (``data[offsets[i]:offsets[i+1]]``, skipped where ``valid[i]`` is
    False) by the JSON number grammar ``-?(0|[1-9][0-9]*)(\\.[0-9]+)?([eE][+-]?[0-9]+)?``
    (nothing else: no spaces, no ``+``, no leading zeros, no hex, no NaN/Infinity) into
    ``cls[i]`` (INT, INT_OVERFLOW, FLOAT, NOT_NUMBER); integer literals within int64 are read
    exactly into ``value[i]``."""
    for i in range(len(cls)):
        cls[i] = NOT_NUMBER
        value[i] = 0
        if not valid[i]:
            continue
        s = offsets[i]
        e = offsets[i + 1]
        j = s
        neg = False
        if j < e and data[j] == 0x2D:  # -
            neg = True
            j += 1
        d0 = j
        if j >= e:
            continue
        if data[j] == 0x30:
            j += 1
        elif 0x31 <= data[j] <= 0x39:
            while j < e and 0x30 <= data[j] <= 0x39:
                j += 1
        else:
            continue
        d1 = j
        is_float = False
        if j < e and data[j] == 0x2E:  # .
            j += 1
            f0 = j
            while j < e and 0x30 <= data[j] <= 0x39:
                j += 1
            if j == f0:
                continue
            is_float = True
        if j < e and (data[j] == 0x65 or data[j] == 0x45):  # e E
            j += 1
            if j < e and (data[j] == 0x2B or data[j] == 0x2D):
                j += 1
            x0 = j
            while j < e and 0x30 <= data[j] <= 0x39:
                j += 1
            if j == x0:
                continue
            is_float = True
        if j != e:
            continue
        if is_float:
            cls[i] = FLOAT
            continue
        nd = d1 - d0
        if nd > 19:
            cls[i] = INT_OVERFLOW
            continue
        if nd == 19:
            lim = _INT64_MIN if neg else _INT64_MAX
            cmp = 0
            for k in range(19):
                if data[d0 + k] != lim[k]:
                    cmp = 1 if data[d0 + k] > lim[k] else -1
                    break
            if cmp > 0:
                cls[i] = INT_OVERFLOW
                continue
            if cmp == 0 and neg:
                cls[i] = INT
                value[i] = -9223372036854775807 - 1
                continue
        v = np.int64(0)
        for k in range(d0, d1):
            v = v * 10 + np.int64(data[k] - 0x30)
        cls[i] = INT
        value[i] = -v if neg else v
