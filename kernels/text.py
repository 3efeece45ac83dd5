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


# byte classes for the scan (outside strings)
_PLAIN, _SPACE, _NEWLINE, _QUOTE, _OBJ, _ARR, _CLOSE, _ESCAPE, _CTRL, _HIGH = range(10)
_CLASS = np.zeros(256, np.uint8)
_CLASS[:0x20] = _CTRL
_CLASS[[0x20, 0x09]] = _SPACE
_CLASS[[0x0A, 0x0D]] = _NEWLINE
_CLASS[0x22] = _QUOTE
_CLASS[0x7B] = _OBJ
_CLASS[0x5B] = _ARR
_CLASS[[0x7D, 0x5D]] = _CLOSE
_CLASS[0x5C] = _ESCAPE
_CLASS[0x80:] = _HIGH


@njit(cache=True, nogil=True)
def scan_json_items(data, starts, ends, status, newlines):
    """For each item ``data[starts[i]:ends[i]]`` set ``status[i]`` (codes above) and
    ``newlines[i]`` (True if it holds a raw CR or LF, which valid JSON allows only as
    whitespace outside strings). Framing only: brackets are counted outside strings (any
    kind), strings and escapes are tracked, UTF-8 is validated; the syntax inside the object
    is left to the JSON parser."""
    cls = _CLASS
    for i in range(len(starts)):
        e = ends[i]
        st = OK
        depth = 0
        done = False  # the first value is closed
        seen = False  # the first value has started
        nl = False
        j = starts[i]
        while j < e:
            c = cls[data[j]]
            if c == _SPACE:
                j += 1
                continue
            if c == _NEWLINE:
                nl = True
                j += 1
                continue
            if c == _HIGH:
                k = _utf8_len(data, j, e)
                if k == 0:
                    st = BAD_UTF8
                    break
                j += k - 1
            if done:
                st = MULTIPLE
                break
            if not seen:
                seen = True
                if c != _OBJ:
                    st = NOT_OBJECT
                    break
            if c == _OBJ or c == _ARR:  # noqa: SIM109 - numba
                depth += 1
            elif c == _CLOSE:
                depth -= 1
                done = depth == 0
            elif c == _QUOTE:
                j += 1
                while j < e:  # inside a string
                    b = data[j]
                    if b == 0x22:
                        break
                    if b == 0x5C:  # the escaped byte is checked like any other
                        j += 1
                        if j >= e:
                            break
                        b = data[j]
                    if b < 0x20:
                        st = CONTROL
                        break
                    if b >= 0x80:
                        k = _utf8_len(data, j, e)
                        if k == 0:
                            st = BAD_UTF8
                            break
                        j += k - 1
                    j += 1
                if st != OK:
                    break
                if j >= e:
                    st = TRUNCATED
                    break
            j += 1
        if st == OK:
            if not seen:
                st = EMPTY
            elif not done:
                st = TRUNCATED
        status[i] = st
        newlines[i] = nl


@njit(cache=True, nogil=True)
def compact_json_items(data, starts, ends, status, out, out_starts):
    """Copy the OK items to ``out``, one per line (``\\n`` after each; their raw CR/LF, only
    whitespace in an OK item, become spaces). ``out_starts[j]`` is where OK item ``j``
    begins; ``out`` needs their lengths + one byte each. Returns the bytes used."""
    pos = 0
    n = 0
    for i in range(len(starts)):
        if status[i] != OK:
            continue
        out_starts[n] = pos
        n += 1
        for j in range(starts[i], ends[i]):
            b = data[j]
            out[pos] = 0x20 if b == 0x0A or b == 0x0D else b
            pos += 1
        out[pos] = 0x0A
        pos += 1
    return pos


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


@njit(cache=True, nogil=True)
def newlines(data, out):
    """Write the positions of the ``\\n`` bytes of ``data`` to ``out`` (one slot each);
    returns how many there are."""
    n = 0
    for j in range(len(data)):
        if data[j] == 0x0A:
            out[n] = j
            n += 1
    return n
