"""Size accounting of a session: the llama.cpp state it rebuilds, its K/V payload before and after coding.

Shared by the reader (:class:`~deltakv_format.session_reader.DkvSession`) and the writer's result
(:class:`~deltakv_format.session_writer.WrittenSession`), which knows the same figures without reading
the file back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .session_schema import TOKEN_BLOB, TrackId, parse_track_part, section_tensor
from .session_tracks import Track, source_row_bytes
from .state_model import Framing

if TYPE_CHECKING:
    from .session_reader import DkvSession


def kv_source_bytes(tracks: list[Track], stream_cells: list[int]) -> int:
    """Bytes of the K/V payloads in the llama.cpp state."""
    return sum(source_row_bytes(t) * stream_cells[t.stream] for t in tracks)


def stored_bytes_by_track(tensor_bytes: Mapping[str, int]) -> dict[TrackId, int]:
    """Bytes of the part tensors of each track, every segment (``tensor_bytes``: name -> bytes)."""
    out: dict[TrackId, int] = {}
    for name, nbytes in tensor_bytes.items():
        parsed = parse_track_part(name)
        if parsed is not None:
            out[parsed[0]] = out.get(parsed[0], 0) + nbytes
    return out


def session_stats(tracks: list[Track], stream_cells: list[int], tensor_bytes: Mapping[str, int], file_size: int) -> dict:
    """``kv_source_bytes`` (the K/V payloads in the llama.cpp state), ``kv_stored_bytes`` (their coded
    tensors in the file) and ``file_bytes``."""
    return {"kv_source_bytes": kv_source_bytes(tracks, stream_cells),
            "kv_stored_bytes": sum(stored_bytes_by_track(tensor_bytes).values()), "file_bytes": file_size}


def rebuilt_state_bytes(session: DkvSession) -> int:
    """Size of the llama.cpp state ``session`` rebuilds (SPEC.md section 4), without decoding."""
    infos = session.file.tensor_infos
    total = 0
    if session.framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE):
        words = session.n_tokens if session.token_format == "plain" else infos[TOKEN_BLOB].nbytes // 4
        total += 12 + 4 * words
    if session.seq_prefix_id is not None:
        total += 8
    if session.arch is not None:
        total += 4 + len(session.arch.encode("utf-8"))
    for i, kind in enumerate(session.section_kind):
        if kind == "opaque":
            info = infos.get(section_tensor(i))
            total += info.nbytes if info else 0
        elif session.section_has_n_stream[i]:
            total += 4
    for g in range(len(session.stream_section)):
        total += 4
        if not session.stream_cells[g]:
            continue
        total += len(session.cells(g)) + 8 + (8 if session.stream_rot_k[g] >= 0 else 0)
        for t in session.tracks:
            if t.stream == g:
                total += 12 + source_row_bytes(t) * session.stream_cells[g]
    return total
