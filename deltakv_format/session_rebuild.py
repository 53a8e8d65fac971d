"""Rebuilding the llama.cpp state a .dkv session holds, without holding it twice (SPEC.md 4, 7).

``rebuild_into``: the state's layout is planned from the header first (every piece's size is
known without decoding), one buffer of exactly that size is allocated, and every K/V track is
decoded straight into its place in it, by a few threads: no join, no per-track copy (a
transposed V, llama.cpp's layout without flash attention, goes through one layer of scratch).
This is what ``deltakv_runtime.load`` hands to ``llama_state_seq_set_data``.

``iter_rebuilt_chunks``: the same bytes as a stream of chunks with at most ``window`` layers
decoded ahead of the one being written, so that ``deltakv restore`` holds a fixed budget plus a
few layers at any session size.

Both give exactly ``write_state(session.to_llama_state(), ...)``'s bytes, which
``to_llama_state`` itself (a state of decoded payloads, for callers that want the typed state)
is built by :func:`session_state` here too.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from .container import element_view_dtype
from .errors import DeltaKVError
from .llama_state import iter_state_chunks
from .session_schema import TOKEN_BLOB, section_tensor
from .session_tracks import Track, source_n_values, tracks_by_stream
from .state_model import Framing, KVCacheSection, KVStream, KVTensor, LlamaState, OpaqueSection

if TYPE_CHECKING:
    from .session_reader import DkvSession

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads decoding tracks: the kernels themselves run one at a time (they are parallel inside, and
Numba's threading layer takes one parallel launch at a time), so more threads than this only
overlap what is around them (reading parts through the mapping, checking them)."""


class PendingPayload:
    """A K/V payload not decoded yet: the track that decodes it and its size in the state."""

    __slots__ = ("track", "cell_count", "nbytes")

    def __init__(self, track: Track, cell_count: int):
        self.track = track
        self.cell_count = cell_count
        self.nbytes = cell_count * track.n_values * element_view_dtype(track.ggml_type).itemsize

    def __len__(self) -> int:  # what write_state checks a payload's size with
        return self.nbytes


def _bytes_of(array: np.ndarray, copy: bool) -> memoryview:
    return memoryview(array.tobytes() if copy else np.ascontiguousarray(array).reshape(-1)).cast("B")


def session_state(session: "DkvSession", payload: Callable[[Track, int], object], *, copy: bool = True) -> LlamaState:
    """The llama.cpp state of ``session`` with each K/V payload given by ``payload(track, cells)``
    (decoded bytes, or a :class:`PendingPayload` for a plan). ``copy=False``: the bytes kept as
    they are (sections, packed tokens) are views into the session's mapping, valid while it is open."""
    sections = []
    stream_iter = 0
    by_stream = tracks_by_stream(session.tracks)
    for i, kind in enumerate(session.section_kind):
        if kind == "opaque":
            name = section_tensor(i)
            data = session.file.tensor(name).reshape(-1) if session.file.has_tensor(name) else np.empty(0, np.uint8)
            sections.append(OpaqueSection(session.section_role[i], _bytes_of(data, copy)))
            continue
        streams = []
        while stream_iter < len(session.stream_section) and session.stream_section[stream_iter] == i:
            g = stream_iter
            n = session.stream_cells[g]
            layers = {"k": [], "v": []}
            for t in by_stream.get(g, []):
                layers[t.id.role].append(KVTensor(t.ggml_type, n, source_n_values(t), t.transposed, payload(t, n)))
            rot = None if session.stream_rot_k[g] < 0 else (session.stream_rot_k[g], session.stream_rot_v[g])
            streams.append(KVStream(
                cell_count=n, cells=memoryview(session.cells(g)), cell_ext_bytes=session.stream_ext[g],
                v_trans=None if session.stream_v_trans[g] < 0 else session.stream_v_trans[g],
                n_layer=None if session.stream_n_layer[g] < 0 else session.stream_n_layer[g], rot=rot,
                k=layers["k"], v=layers["v"],
            ))
            stream_iter += 1
        sections.append(KVCacheSection(bool(session.section_has_n_stream[i]), streams))
    if session.token_format == "plain":
        token_words = memoryview(session.tokens().astype("<i4").tobytes())
    elif session.token_format == "packed":
        token_words = _bytes_of(session.file.tensor(TOKEN_BLOB).reshape(-1), copy)
    else:
        token_words = None
    arch = session.arch
    return LlamaState(
        framing=session.framing, layout=session.layout, file_version=session.file_version, token_words=token_words,
        seq_prefix_id=session.seq_prefix_id, arch=arch, arch_bytes=None if arch is None else arch.encode("utf-8"),
        sections=sections,
    )


@dataclass
class RebuildPlan:
    """The rebuilt state's bytes in order: fixed pieces (bytes-like) and pending K/V payloads."""

    pieces: list
    size: int

    @property
    def payloads(self) -> list[tuple[int, PendingPayload]]:
        """(offset in the state, payload) of every K/V payload."""
        out, at = [], 0
        for piece in self.pieces:
            if isinstance(piece, PendingPayload):
                out.append((at, piece))
            at += len(piece)
        return out


def plan_rebuild(session: "DkvSession", *, framing: Framing | None = None, tokens=None,
                 seq_id: int | None = None, file_version: int | None = None) -> RebuildPlan:
    """Where every byte of the rebuilt state goes, from the header alone (nothing is decoded).
    ``framing`` and the rest as for :func:`~deltakv_format.llama_state.write_state`."""
    state = session_state(session, PendingPayload, copy=False)
    pieces = list(iter_state_chunks(state, framing=framing, tokens=tokens, seq_id=seq_id, file_version=file_version))
    return RebuildPlan(pieces, sum(len(p) for p in pieces))


def decode_payload(session: "DkvSession", payload: PendingPayload, dst: np.ndarray) -> None:
    """Decode ``payload``'s track into ``dst`` (uint8, exactly its bytes), laid out as llama.cpp has it."""
    t, n = payload.track, payload.cell_count
    if dst.dtype != np.uint8 or dst.shape != (payload.nbytes,):
        raise DeltaKVError(f"{t.name}: expected a buffer of {payload.nbytes} bytes, found {dst.dtype} {dst.shape}")
    if not payload.nbytes:
        return
    dt = element_view_dtype(t.ggml_type)
    aligned = dst.ctypes.data % dt.itemsize == 0
    if not t.transposed and aligned:
        session.rows(t, out=dst.view(dt).reshape(n, t.n_values))
    elif t.transposed and dt != np.uint8 and aligned:
        # llama.cpp's V without flash attention is channel-major: one layer of scratch, transposed in
        np.copyto(dst.view(dt).reshape(t.n_values, n), session.rows(t).T)
    else:
        dst[:] = np.frombuffer(KVTensor.payload_from_rows(session.rows(t), t.transposed), np.uint8)


def release_track(session: "DkvSession", track: Track) -> None:
    """Drop the mapped pages of ``track``'s parts from the resident set once it is decoded (the
    mapping is read-only: a later read faults them in again from the page cache)."""
    roles = [part.role for part in track.codec.parts(track.ggml_type, track.n_values)]
    session.file.release(track.part_name(s, role) for s in range(session.n_segments) for role in roles)


def read_parts(session: "DkvSession") -> None:
    """Bring the whole file in (one sequential pass: the OS's read-ahead does the rest) and check
    every tensor's checksum, so that decoding then touches only memory. Without checksums (a file
    opened with ``verify_checksums=False``) only the read-ahead is asked for. Each tensor's mapped
    pages leave the resident set once checked (decoding maps them again from the page cache, and
    releases them once its track is done), so that a load holds the state buffer, not the file too."""
    session.file.read_ahead()
    if session.file.verify_checksums:
        session.file.verify_tensors(release=True)  # the page cache keeps them; the resident set does not grow


def rebuild_into(session: "DkvSession", out: np.ndarray | None = None, *, framing: Framing | None = None,
                 tokens=None, seq_id: int | None = None, file_version: int | None = None,
                 workers: int = DEFAULT_WORKERS, seconds: dict | None = None) -> np.ndarray:
    """The rebuilt state in one buffer (``out``, uint8 of exactly the state's size, or a new one),
    every track decoded straight into its place. ``seconds`` (a dict) gets ``plan``, ``read``
    (the file through the mapping, checksums) and ``decode``."""
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    plan = plan_rebuild(session, framing=framing, tokens=tokens, seq_id=seq_id, file_version=file_version)
    if out is None:
        out = np.empty(plan.size, np.uint8)
    elif out.dtype != np.uint8 or out.shape != (plan.size,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise DeltaKVError(f"rebuild_into: expected a writable uint8 buffer of {plan.size} bytes, found "
                           f"{out.dtype} {out.shape}")
    payloads = []
    at = 0
    for piece in plan.pieces:
        n = len(piece)
        if isinstance(piece, PendingPayload):
            payloads.append((at, piece))
        elif n:
            out[at:at + n] = np.frombuffer(piece, np.uint8)
        at += n
    t1 = time.perf_counter()
    read_parts(session)
    t2 = time.perf_counter()

    def one(item):
        offset, payload = item
        decode_payload(session, payload, out[offset:offset + payload.nbytes])
        release_track(session, payload.track)

    if workers <= 1 or len(payloads) <= 1:
        for item in payloads:
            one(item)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(one, payloads):  # re-raises the first failure
                pass
    t3 = time.perf_counter()
    seconds.update(plan=t1 - t0, read=t2 - t1, decode=t3 - t2)
    return out


def iter_rebuilt_chunks(session: "DkvSession", *, framing: Framing | None = None, tokens=None,
                        seq_id: int | None = None, file_version: int | None = None, window: int = 2,
                        workers: int = DEFAULT_WORKERS) -> Iterator[bytes | memoryview | np.ndarray]:
    """The rebuilt state's bytes in order, each K/V payload decoded into a buffer of its own while
    at most ``window`` later ones are decoded ahead (by ``workers`` threads). A consumer that writes
    each chunk before asking for the next holds at most ``window + 1`` layers of the state; the
    mapped pages of the parts decoded are released as it goes (:func:`release_track`), and their
    checksums checked tensor by tensor as they are first read."""
    plan = plan_rebuild(session, framing=framing, tokens=tokens, seq_id=seq_id, file_version=file_version)
    window = max(1, window)
    ahead: deque = deque()  # futures of the next payloads, in order
    upcoming = iter([p for p in plan.pieces if isinstance(p, PendingPayload)])
    last_stream = None

    def decoded(payload: PendingPayload) -> np.ndarray:
        buf = np.empty(payload.nbytes, np.uint8)
        decode_payload(session, payload, buf)
        release_track(session, payload.track)
        return buf

    with ThreadPoolExecutor(max_workers=max(1, min(workers, window))) as pool:
        def top_up():
            while len(ahead) < window:
                payload = next(upcoming, None)
                if payload is None:
                    return
                ahead.append(pool.submit(decoded, payload))

        try:
            for piece in plan.pieces:
                if not isinstance(piece, PendingPayload):
                    if len(piece):
                        yield piece
                    continue
                if last_stream is not None and piece.track.stream != last_stream:
                    session.release_decode_caches()  # positions and rotary tables of the stream done
                last_stream = piece.track.stream
                top_up()
                buf = ahead.popleft().result()
                top_up()
                yield buf
                del buf
        finally:
            for future in ahead:
                future.cancel()
