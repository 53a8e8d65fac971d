"""Cell records and segment ownership: which segment holds which rows of a stream (SPEC.md 3.2, 4).

A cell record is ``i32 pos, u32 n_seq_id, [ext record], i32 seq_id[n_seq_id]``; a segment stores the
records of the rows it holds, and owns every row from its first on (later segments override earlier ones).
"""

from __future__ import annotations

import numpy as np

from .errors import CorruptError


def cell_record_ends(cells, count: int, ext_bytes: int) -> np.ndarray:
    """Byte offset of the end of each cell record: i32 pos, u32 n_seq_id, [ext], i32 seq_id[n]."""
    buf = memoryview(cells)
    if count * 8 > len(buf):  # each record has at least 8 bytes: check before allocating per count
        raise CorruptError(f"{count} cell records need at least {count * 8} bytes, found {len(buf)}", offset=0)
    one_id = 12 + ext_bytes  # the usual record: one sequence id (every cell of a sequence state)
    if len(buf) == count * one_id and count:
        n_seq = np.frombuffer(buf, np.uint8).reshape(count, one_id)[:, 4:8].copy().view("<u4").reshape(-1)
        if np.all(n_seq == 1):
            return np.arange(1, count + 1, dtype=np.int64) * one_id
    ends = np.empty(count, np.int64)
    pos = 0
    for i in range(count):
        if pos + 8 + ext_bytes > len(buf):
            raise CorruptError(f"cell {i} record ends past the {len(buf)} bytes of cell records", offset=pos)
        n_seq = int.from_bytes(buf[pos + 4:pos + 8], "little")
        pos += 8 + ext_bytes + 4 * n_seq
        if pos > len(buf):
            raise CorruptError(f"cell {i} claims {n_seq} sequence ids, past the end of the cell records", offset=pos)
        ends[i] = pos
    return ends


def cell_positions(cells, count: int, ext_bytes: int) -> np.ndarray:
    """The ``pos`` field (i32) of each of ``count`` cell records."""
    ends = cell_record_ends(cells, count, ext_bytes)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if count else np.empty(0, np.int64)
    raw = np.frombuffer(memoryview(cells), np.uint8)
    if count and ends[-1] > raw.size:
        raise CorruptError(f"{count} cell records end past their {raw.size} bytes", offset=int(raw.size))
    idx = starts[:, None] + np.arange(4)[None, :]
    return raw[idx].copy().view("<i4").reshape(-1).astype(np.int32)


def owned_spans(seg_first_row, seg_rows, stream: int) -> list[tuple[int, int, int]]:
    """(segment, first row, end row) of the rows of ``stream`` each segment still owns, in row order.

    A segment owns every row from its first on (SPEC.md 3.2): earlier ones keep what is before."""
    spans = []
    for s in range(len(seg_rows)):
        rows = int(seg_rows[s][stream])
        if not rows:
            continue
        first = int(seg_first_row[s][stream])
        spans = [(seg, lo, min(hi, first)) for seg, lo, hi in spans]
        spans.append((s, first, first + rows))
    return [sp for sp in spans if sp[2] > sp[1]]


def assemble_cells(spans, records_of_segment, ext_bytes: int, stream: int) -> bytes:
    """The cell records of a stream from its owned ``spans``; ``records_of_segment(s)`` gives the
    record bytes segment ``s`` stores and how many records they are."""
    out = []
    for s, first, end in spans:
        raw, rows = records_of_segment(s)
        ends = cell_record_ends(raw, rows, ext_bytes)
        if len(ends) and ends[-1] != len(raw):
            raise CorruptError(f"cell records of stream {stream} segment {s} have {len(raw) - ends[-1]} extra bytes")
        out.append(bytes(raw[:ends[end - first - 1]]) if end > first else b"")
    return b"".join(out)
