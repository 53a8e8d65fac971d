"""Fuzz targets, structure-aware mutators and seed builders shared by the atheris harnesses
(fuzz/fuzz_dkv.py, fuzz/fuzz_state.py) and the CI smoke run (tests/test_fuzz_smoke.py).

The contract every target checks (SECURITY.md):

- nothing but a :class:`deltakv_format.errors.DeltaKVError` escapes the readers;
- no input makes them allocate more than ``alloc_bound(len(input))`` (tracemalloc peak, which
  sees Python and numpy allocations; the input's own bytes are mmapped or held by the caller);
- no input makes them hang (the harness sets a per-input time limit);
- what parses round-trips: ``write_state(parse_state(b)) == b``, and a raw-codec .dkv of a
  parsed state restores the same bytes.

A violation raises :class:`ContractViolation` carrying the original exception.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

from deltakv_format.container import HEADER_CRC_VALUE_OFFSET, KEY_HEADER_CRC, KEY_TENSOR_CRC, crc32c, header_crc  # noqa: E402
from deltakv_format.constants import GGUFValueType  # noqa: E402
from deltakv_format.errors import DeltaKVError  # noqa: E402
from deltakv_format.gguf_io import parse_header  # noqa: E402
from deltakv_format.llama_state import parse_server_tokens, parse_state, write_state  # noqa: E402
from deltakv_format.state_model import Framing, KVCacheSection  # noqa: E402

MB = 1 << 20


def alloc_bound(n_input: int) -> int:
    """The most a reader may allocate for an input of ``n_input`` bytes (SECURITY.md).

    The llama.cpp state a .dkv rebuilds is at most 128 / 18 = 7.1x the file (Q4_0 blocks decoded
    to F32 rows; 3.6x for F16 caches), because every part tensor is checked against the rows it
    must hold. Rebuilding and serialising the state holds it twice: 14.2x. Measured: 13.7x for an
    F32 cache stored with q4_0, 5.3x for an F16 one. The fuzz runs of 2026-11-29 checked the
    tighter 8x + 64 MB (no input came near it; their inputs are F16 and small).
    """
    return 16 * n_input + 64 * MB


class ContractViolation(Exception):
    def __init__(self, kind: str, detail: str, cause: BaseException | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.cause = cause

    def key(self) -> str:
        """A de-duplication key: the violation kind and the innermost deltakv frame."""
        where = ""
        tb = self.cause.__traceback__ if self.cause is not None else None
        while tb is not None:
            f = tb.tb_frame.f_code.co_filename
            if "deltakv_format" in f or "/fuzz/" in f:
                where = f"{Path(f).name}:{tb.tb_lineno}"
            tb = tb.tb_next
        cause = type(self.cause).__name__ if self.cause is not None else ""
        return f"{self.kind}/{cause}/{where}"


class _Guard:
    """Turns escaping non-DeltaKVError exceptions and excess allocation into ContractViolation."""

    def __init__(self, n_input: int, what: str):
        self.n_input = n_input
        self.what = what

    def __enter__(self):
        self.started = not tracemalloc.is_tracing()
        if self.started:
            tracemalloc.start()
        tracemalloc.reset_peak()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, et, e, tb):
        peak = tracemalloc.get_traced_memory()[1] - self.base
        if self.started:
            tracemalloc.stop()
        if et is not None and not issubclass(et, (DeltaKVError, ContractViolation)):
            if issubclass(et, KeyboardInterrupt):
                return False
            raise ContractViolation(f"{self.what} raised {et.__name__}", str(e)[:300], e) from e
        if peak > alloc_bound(self.n_input):
            raise ContractViolation(
                f"{self.what} allocated too much", f"peak {peak} bytes for a {self.n_input}-byte input"
            )
        return et is not None and issubclass(et, DeltaKVError)  # swallow DeltaKVError


# ---- targets -----------------------------------------------------------------------------------


class DkvTarget:
    """Open a .dkv (bytes written to a scratch file), verify it, decode everything, rebuild the state."""

    def __init__(self, workdir: str | os.PathLike | None = None):
        base = workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.dir = Path(tempfile.mkdtemp(prefix="dkvfuzz.", dir=base))
        self.path = self.dir / "input.dkv"

    def __call__(self, data: bytes) -> None:
        from deltakv_format.session import DkvSession

        self.path.write_bytes(data)
        with _Guard(len(data), "dkv reader"):
            with DkvSession(self.path) as s:
                s.file.verify()
                s.tokens()
                s.source_bytes()
                s.stats()
                state = s.to_llama_state()
                write_state(state)  # what `deltakv restore` and the runtime hand to llama.cpp
                del state

    def cleanup(self):
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class StateTarget:
    """parse_state with detected and forced framings (and a model, if one is installed); what
    parses must write back byte-identical and survive a raw .dkv round trip."""

    def __init__(self, workdir: str | os.PathLike | None = None, *, convert: bool = True):
        base = workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.dir = Path(tempfile.mkdtemp(prefix="statefuzz.", dir=base))
        self.convert = convert
        self.models = []
        try:
            from deltakv_format.model_info import ModelInfo
            from deltakv_tools.models import smollm2

            p = smollm2()
            if p is not None:
                self.models.append(ModelInfo.from_gguf(p))
        except Exception:  # pragma: no cover - no model installed
            pass

    def __call__(self, data: bytes) -> None:
        with _Guard(len(data), "parse_state"):
            state = parse_state(data)
            out = write_state(state)
            if out != data:
                n = next((i for i, (a, b) in enumerate(zip(out, data)) if a != b), min(len(out), len(data)))
                raise ContractViolation("round trip", f"write_state(parse_state(b)) differs from b at byte {n} "
                                                      f"({len(out)} vs {len(data)} bytes)")
            del out
            if state.token_words is not None:
                parse_server_tokens(state.token_words)
            from deltakv_format.operations import inspect_state

            inspect_state(state)
            # the other framing of the same body (session file <-> state, sequence file <-> state)
            other = {Framing.SESSION_FILE: Framing.STATE, Framing.STATE: Framing.SESSION_FILE,
                     Framing.SEQUENCE_FILE: Framing.SEQ_STATE, Framing.SEQ_STATE: Framing.SEQUENCE_FILE}[state.framing]
            try:
                conv = write_state(state, framing=other, tokens=state.tokens() if state.token_words is None else None)
            except DeltaKVError:
                conv = None
            if conv is not None:
                try:
                    parse_state(conv, framing=other)
                except DeltaKVError:
                    pass
                del conv
            if self.convert:
                self._dkv_round_trip(state, data)
        h = crc32c(data[:64])
        with _Guard(len(data), "parse_state(framing=...)"):
            parse_state(data, framing=list(Framing)[h % len(Framing)])
        if self.models and h % 3 == 0:
            with _Guard(len(data), "parse_state(model=...)"):
                parse_state(data, model=self.models[0])

    def _dkv_round_trip(self, state, data: bytes) -> None:
        from deltakv_format.session import DkvSession, write_session

        path = self.dir / "rt.dkv"
        write_session(state, path, "raw")
        with DkvSession(path) as s:
            problems = s.file.verify()
            if problems:
                raise ContractViolation("raw .dkv round trip", f"verify() of a fresh file: {problems[:2]}")
            back = write_state(s.to_llama_state())
        if back != data:
            raise ContractViolation("raw .dkv round trip", f"restored {len(back)} bytes differ from the {len(data)} input bytes")

    def cleanup(self):
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


# ---- mutators ------------------------------------------------------------------------------------

def gguf_fields(buf) -> list[tuple[int, int]]:
    """(offset, width) of the integer fields of a GGUF header: counts, lengths, types, scalar values,
    array counts and (some) elements, tensor dimensions, types and offsets, as gguf_io's parser reads
    them. Tolerates damage: the fields read before the parser stopped."""
    fields: list[tuple[int, int]] = []
    try:
        parse_header(buf, what="fuzz", fields=fields)
    except DeltaKVError:
        pass
    return fields


def _addr(mv) -> int:
    import numpy as np

    return np.frombuffer(mv, np.uint8).ctypes.data if len(mv) else -1


def state_fields(buf) -> list[tuple[int, int]]:
    """(offset, width) of the size-bearing words of a llama.cpp state, found by parsing it."""
    fields = [(0, 4), (4, 4), (8, 4)]
    try:
        state = parse_state(buf)
    except DeltaKVError:
        return fields
    base = _addr(buf)
    if base < 0:
        return fields
    for sec in state.sections:
        if not isinstance(sec, KVCacheSection):
            a = _addr(sec.data)
            if a >= 0:
                fields.append((a - base, 4))
            continue
        for st in sec.streams:
            a = _addr(st.cells)
            if a < 0:
                continue
            off = a - base
            fields += [(off - 4, 4), (off + 4, 4), (off + len(st.cells), 4), (off + len(st.cells) + 4, 4)]
            for t in st.k + st.v:
                d = _addr(t.data) - base
                if t.transposed:
                    fields += [(d - 12, 4), (d - 8, 4), (d - 4, 4)]
                else:
                    fields += [(d - 12, 4), (d - 8, 8)]
    return [(o, w) for o, w in fields if 0 <= o and o + w <= len(buf)]


def interesting(value: int, width: int, rnd: random.Random, size: int) -> int:
    top = (1 << (8 * width)) - 1
    choices = [0, 1, 2, 3, 4, 7, 8, 12, 31, 32, 33, 63, 64, 65, 127, 128, 255, 256, 0x7FFF, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 40) + 1, 1 << 62, (1 << 63) - 1, 1 << 63,
               top, top - 1, value + 1, value - 1, value * 2, value // 2, value + size, size, size // 2, size * 4,
               top - value, value ^ (1 << rnd.randrange(8 * width)), rnd.getrandbits(8 * width)]
    return rnd.choice(choices) & top


def mutate_fields(data: bytes, fields: list[tuple[int, int]], rnd: random.Random, n: int = 1) -> bytearray:
    buf = bytearray(data)
    if not fields:
        return buf
    for _ in range(n):
        off, w = rnd.choice(fields)
        v = int.from_bytes(buf[off:off + w], "little")
        buf[off:off + w] = interesting(v, w, rnd, len(buf)).to_bytes(w, "little")
    return buf


def fix_dkv_checksums(buf: bytearray) -> bytearray:
    """Recompute the tensor CRCs and the header CRC where the header still parses, so that a
    mutation reaches the checks behind the checksums."""
    try:
        h = parse_header(buf, what="fuzz")
    except DeltaKVError:
        return buf
    ds = h.data_start
    if ds > len(buf):
        return buf
    kv = h.kvs.get(KEY_TENSOR_CRC)
    if kv is not None and kv.element_type == GGUFValueType.UINT32 and len(kv.value) == len(h.tensors):
        base = kv.value_offset + 12
        for i, t in enumerate(h.tensors):
            start = ds + t.offset
            end = start + t.nbytes
            if end <= len(buf) and base + 4 * i + 4 <= ds:
                struct.pack_into("<I", buf, base + 4 * i, crc32c(bytes(buf[start:end])))
    first = next(iter(h.kvs), None)
    if first == KEY_HEADER_CRC and h.kvs[first].value_offset == HEADER_CRC_VALUE_OFFSET:
        struct.pack_into("<I", buf, HEADER_CRC_VALUE_OFFSET, header_crc(buf, ds))
    return buf


def _generic(data: bytes, rnd: random.Random, max_size: int) -> bytes:
    """A small byte-level mutation (used where libFuzzer's own mutator is not at hand)."""
    buf = bytearray(data)
    op = rnd.randrange(6)
    if not buf:
        return bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(1, 64)))
    if op == 0:  # flip bits
        for _ in range(rnd.randrange(1, 4)):
            i = rnd.randrange(len(buf))
            buf[i] ^= 1 << rnd.randrange(8)
    elif op == 1:  # random bytes
        i = rnd.randrange(len(buf))
        for j in range(i, min(len(buf), i + rnd.randrange(1, 9))):
            buf[j] = rnd.getrandbits(8)
    elif op == 2:  # truncate
        del buf[rnd.randrange(len(buf)):]
    elif op == 3:  # delete a range
        i = rnd.randrange(len(buf))
        del buf[i:i + rnd.randrange(1, 256)]
    elif op == 4:  # duplicate a range
        i = rnd.randrange(len(buf))
        buf[i:i] = buf[i:i + rnd.randrange(1, 256)]
    else:  # any aligned integer
        i = rnd.randrange(len(buf)) & ~3
        w = rnd.choice((4, 8))
        if i + w <= len(buf):
            buf[i:i + w] = interesting(int.from_bytes(buf[i:i + w], "little"), w, rnd, len(buf)).to_bytes(w, "little")
    return bytes(buf[:max_size])


_STRINGS = ["", "kv", "opaque", "attention", "outputs", "recurrent", "raw", "f16", "q8_0", "q4_0", "delta-q4_0",
            "dkv-q4", "dkv-ans", "zstd", "ggsn", "ggsq", "state", "seqstate", "v9", "v9-outputs", "v9-outputs-streams", "v10",
            "v11", "plain", "packed", "none", "llama", "s0.l0.k", "s0.l0.v", "s1.l0.k", "s0.l1.k", "deltakv",
            "\u00e9", "x" * 300]
_NAMES = ["tokens.0", "tokens.1", "token_blob", "section.0", "section.1", "s0.cells.0", "s0.cells.1", "s1.cells.0",
          "s0.l0.k.0.data", "s0.l0.k.0.key", "s0.l0.k.0.q4", "s0.l0.k.0.mode", "s0.l0.v.0.data", "s0.l0.k.1.key",
          "s0.l0.k.0.sink", "s0.l0.k.0.head", "s0.l0.k.1.head", "s0.l0.k.1.data"]
# deltakv.track.params values (format v2): hostile codec parameters, each a JSON string
_PARAMS = ['{}', '[]', '{"rate":"x"}', '{"rope":3}', '{"stream_rows":0}', '{"sink_rows":-1}', '{"rate":1e9}',
           '{"rope":1,"rope_dims":64,"head_dim":7,"theta_scale_f32":1060283654}',
           '{"rope":2,"rope_dims":256,"head_dim":256,"theta_scale_f32":4294967295}',
           '{"rope":1,"rope_dims":64,"head_dim":64,"theta_scale_f32":1060283654,"freq_scale_f32":2143289344}',
           '{"stream_rows":1,"sink_rows":65536}', '{"unknown":1}', '{"rate":440' ]
_SIGNED = {GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64}
_WIDTH = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
          GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8,
          GGUFValueType.BOOL: 1}


def _int_of_type(v: int, vt) -> int:
    w = _WIDTH[vt]
    v &= (1 << (8 * w)) - 1
    if vt in _SIGNED and v >= 1 << (8 * w - 1):
        v -= 1 << (8 * w)
    if vt == GGUFValueType.BOOL:
        v &= 1
    return v


def _header_for_mutation(data: bytes):
    """(key-values without the checksums and reserve, tensor infos, data section) of a .dkv, or None."""
    from deltakv_format.container import KEY_RESERVE

    try:
        h = parse_header(data, what="fuzz")
    except DeltaKVError:
        return None
    if h.data_start > len(data):
        return None
    kvs = [kv for kv in h.kvs.values() if kv.key not in (KEY_HEADER_CRC, KEY_TENSOR_CRC, KEY_RESERVE)]
    return kvs, list(h.tensors), data[h.data_start:]


def _reserialise(kvs, infos, section: bytes):
    """A valid GGUF of ``kvs`` and ``infos`` over ``section``, with correct checksums; None if the
    mutated values cannot be serialised."""
    from deltakv_format.container import build_header

    try:
        crcs = [crc32c(section[t.offset:t.offset + t.nbytes]) if t.offset + t.nbytes <= len(section) else 0
                for t in infos]
        return build_header(kvs, infos, crcs, None) + section
    except (ValueError, OverflowError, struct.error, KeyError, TypeError, UnicodeError):
        return None


def mutate_dkv_semantic(data: bytes, rnd: random.Random):
    """Change one key-value or tensor info of a parsed header and re-serialise it: a valid GGUF
    with valid checksums whose Delta-KV metadata is off (what the session checks must catch)."""
    import numpy as np

    from deltakv_format.gguf_io import KeyValue, TensorInfo

    parsed = _header_for_mutation(data)
    if parsed is None:
        return None
    kvs, infos, section = parsed
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        op = rnd.random()
        if not kvs and not infos:
            break  # a header with nothing left to change (the mutations so far removed it all)
        if (op < 0.6 or not infos) and kvs:
            i = rnd.randrange(len(kvs))
            kv = kvs[i]
            if kv.value_type == GGUFValueType.ARRAY and kv.element_type == GGUFValueType.STRING:
                vals = list(kv.value)
                r = rnd.random()
                if vals and r < 0.5:
                    vals[rnd.randrange(len(vals))] = rnd.choice(_STRINGS + vals)
                elif vals and r < 0.7:
                    del vals[rnd.randrange(len(vals))]
                else:
                    vals.insert(rnd.randrange(len(vals) + 1), rnd.choice(_STRINGS + vals))
                kvs[i] = KeyValue(kv.key, kv.value_type, vals, kv.element_type)
            elif kv.value_type == GGUFValueType.ARRAY and kv.element_type in _WIDTH:
                vals = [int(v) for v in kv.value]
                r = rnd.random()
                if vals and r < 0.6:
                    j = rnd.randrange(len(vals))
                    vals[j] = _int_of_type(interesting(vals[j] & ((1 << 64) - 1), _WIDTH[kv.element_type], rnd, len(data)),
                                           kv.element_type)
                elif vals and r < 0.75:
                    del vals[rnd.randrange(len(vals))]
                elif r < 0.9:
                    vals.insert(rnd.randrange(len(vals) + 1), rnd.choice(vals) if vals else 0)
                else:  # another element type
                    et = rnd.choice([GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.UINT8])
                    kvs[i] = KeyValue(kv.key, kv.value_type, np.array([_int_of_type(v, et) for v in vals],
                                      dtype={GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
                                             GGUFValueType.UINT64: "<u8", GGUFValueType.UINT8: "<u1"}[et]), et)
                    continue
                dt = kv.value.dtype if hasattr(kv.value, "dtype") else np.dtype("<u8")
                kvs[i] = KeyValue(kv.key, kv.value_type, np.array(vals, dtype=dt), kv.element_type)
            elif kv.value_type == GGUFValueType.STRING:
                kvs[i] = KeyValue(kv.key, kv.value_type, rnd.choice(_STRINGS))
            elif kv.value_type in _WIDTH:
                r = rnd.random()
                if r < 0.8:
                    v = _int_of_type(interesting(int(kv.value) & ((1 << 64) - 1), _WIDTH[kv.value_type], rnd, len(data)),
                                     kv.value_type)
                    kvs[i] = KeyValue(kv.key, kv.value_type, v)
                else:
                    kvs[i] = KeyValue(kv.key, GGUFValueType.STRING, rnd.choice(_STRINGS))
            elif rnd.random() < 0.5:
                del kvs[i]
        else:
            i = rnd.randrange(len(infos))
            t = infos[i]
            r = rnd.random()
            if r < 0.3:
                shape = list(t.shape) or [1]  # a 0-dim tensor info: give it a dimension to mutate
                j = rnd.randrange(len(shape))
                shape[j] = interesting(shape[j], 8, rnd, len(section)) % (1 << 62)
                if rnd.random() < 0.2 and len(shape) < 4:
                    shape.append(rnd.choice((1, 2)))
                infos[i] = TensorInfo(t.name, tuple(shape), t.ggml_type, t.offset)
            elif r < 0.45:
                ty = rnd.choice([0, 1, 2, 8, 24, 26, 30, 12, t.ggml_type])
                infos[i] = TensorInfo(t.name, t.shape, ty, t.offset)
            elif r < 0.6:
                off = rnd.choice([0, t.offset + 64, t.offset - 64, rnd.choice(infos).offset, len(section) // 64 * 64])
                infos[i] = TensorInfo(t.name, t.shape, t.ggml_type, max(off, 0))
            elif r < 0.8:
                name = rnd.choice(_NAMES + [x.name for x in infos])
                if name not in {x.name for x in infos}:
                    infos[i] = TensorInfo(name, t.shape, t.ggml_type, t.offset)
            else:
                del infos[i]
    return _reserialise(kvs, infos, section)


def mutate_dkv_ans_parts(data: bytes, rnd: random.Random):
    """Format v2: change bytes of a dkv-ans ``head`` (step, means, class tables, stream offsets) or set
    a track's ``deltakv.track.params`` to a hostile value; re-serialised with valid checksums."""
    from deltakv_format.gguf_io import KeyValue

    parsed = _header_for_mutation(data)
    if parsed is None:
        return None
    kvs, infos, section = parsed
    section = bytearray(section)
    heads = [t for t in infos if t.name.endswith(".head") and t.offset + t.nbytes <= len(section) and t.nbytes]
    params = next((i for i, kv in enumerate(kvs) if kv.key == "deltakv.track.params"), None)
    if heads and (params is None or rnd.random() < 0.6):
        t = rnd.choice(heads)
        for _ in range(rnd.choice((1, 1, 2, 4))):
            w = rnd.choice((1, 2, 4))
            i = t.offset + rnd.randrange(max(t.nbytes - w + 1, 1))
            w = min(w, t.offset + t.nbytes - i)
            section[i:i + w] = interesting(int.from_bytes(section[i:i + w], "little"), w, rnd, t.nbytes).to_bytes(w, "little")
    elif params is not None and len(kvs[params].value):
        kv = kvs[params]
        values = list(kv.value)
        values[rnd.randrange(len(values))] = rnd.choice(_PARAMS)
        kvs[params] = KeyValue(kv.key, kv.value_type, values, kv.element_type)
    else:
        return None
    return _reserialise(kvs, infos, bytes(section))


def mutate_dkv(data: bytes, max_size: int, seed: int, generic=None) -> bytes:
    """Key-value / tensor-info mutations re-serialised with valid checksums (half the time), raw
    header-field mutations, or byte-level ones, mostly with the checksums fixed afterwards."""
    rnd = random.Random(seed)
    generic = generic or (lambda d, m: _generic(d, rnd, m))
    r = rnd.random()
    if r < 0.5:
        out = mutate_dkv_ans_parts(data, rnd) if rnd.random() < 0.2 else mutate_dkv_semantic(data, rnd)
        if out is not None and len(out) <= max_size:
            return out
    if r < 0.75:
        buf = mutate_fields(data, gguf_fields(data), rnd, rnd.choice((1, 1, 1, 2, 3)))
    elif r < 0.85:  # damage the data section, then re-checksum (reaches the decoders)
        buf = bytearray(generic(data, max_size))
    else:
        buf = bytearray(generic(data, max_size))
        if rnd.random() < 0.5:
            return bytes(buf)
    if rnd.random() < 0.9:
        buf = fix_dkv_checksums(buf)
    return bytes(buf[:max_size])


def mutate_state(data: bytes, max_size: int, seed: int, generic=None) -> bytes:
    rnd = random.Random(seed)
    generic = generic or (lambda d, m: _generic(d, rnd, m))
    if rnd.random() < 0.5:
        return bytes(mutate_fields(data, state_fields(data), rnd, rnd.choice((1, 1, 2)))[:max_size])
    return generic(data, max_size)


# ---- seeds ---------------------------------------------------------------------------------------

STATE_SEEDS = [p for p in sorted(FIXTURES.glob("*")) if p.suffix in (".ggsn", ".ggsq", ".state", ".seqstate")]


def synthetic_states():
    """Tiny hand-built states (tests/synthetic.py) in two framings, for fast seeds."""
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.synthetic import SyntheticContext

    out = {}
    for name, kw in {"f16_vt1": {}, "f16_vt0": {"v_trans": 0}, "f32_ext": {"ggml_type": 0, "ext_bytes": 12}}.items():
        ctx = SyntheticContext(n_max=48, n_layer=2, n_values=64, seed=3, **kw)
        for framing in (Framing.SESSION_FILE, Framing.STATE):
            out[f"syn_{name}_{framing.value}"] = ctx.state(40, framing)
    return out


def shrink_state(state, n_cells: int, n_layers: int):
    """A real fixture's state cut to its first ``n_cells`` cells and ``n_layers`` layers per cache
    (legacy outputs emptied): the same structure at a size that fuzzes fast."""
    from dataclasses import replace

    import numpy as np

    from deltakv_format.session import cell_record_ends
    from deltakv_format.state_model import KVTensor, OpaqueSection

    def cut(t, m):
        rows = t.rows()[:m]
        return KVTensor(t.ggml_type, m, t.n_values, t.transposed, KVTensor.payload_from_rows(rows, t.transposed))

    sections = []
    for sec in state.sections:
        if isinstance(sec, OpaqueSection):
            data = b"\0" * 20 if sec.role == "outputs" else sec.data  # n_outputs = n_logits = n_embd = 0
            sections.append(OpaqueSection(sec.role, memoryview(data)))
            continue
        streams = []
        for st in sec.streams:
            if st.cell_count == 0:
                streams.append(st)
                continue
            m = min(n_cells, st.cell_count)
            ends = cell_record_ends(st.cells, st.cell_count, st.cell_ext_bytes)
            nl = min(n_layers, len(st.k))
            streams.append(replace(st, cell_count=m, cells=st.cells[: int(ends[m - 1])], n_layer=nl,
                                   k=[cut(t, m) for t in st.k[:nl]], v=[cut(t, m) for t in st.v[:nl]]))
        sections.append(KVCacheSection(sec.has_n_stream, streams))
    words = state.token_words
    if words is not None and state.tokens() is not None:
        words = memoryview(np.frombuffer(words, "<i4")[:n_cells].tobytes())
    return replace(state, sections=sections, token_words=words)


def small_fixture_states() -> dict:
    """Every fixture shrunk (two sizes); only those that parse back unambiguously as themselves."""
    out = {}
    for p in STATE_SEEDS:
        state = parse_state(p.read_bytes())
        for n_cells, n_layers in ((5, 2), (40, 1)):
            small = shrink_state(state, n_cells, n_layers)
            raw = write_state(small)
            try:
                ok = write_state(parse_state(raw)) == raw and parse_state(raw).layout == small.layout
            except DeltaKVError:
                ok = False
            if ok:
                out[f"{p.stem}_{p.suffix[1:]}_c{n_cells}l{n_layers}"] = small
    return out


def _write_small_reserve(state, path, codec):
    """write_session with a small header reserve (fewer bytes to fuzz; still a valid file)."""
    import deltakv_format.container as container
    from deltakv_format.session import write_session

    saved = container.HEADER_RESERVE_MIN
    container.HEADER_RESERVE_MIN = 256
    try:
        write_session(state, path, codec)
    finally:
        container.HEADER_RESERVE_MIN = saved


def make_dkv_seeds(outdir) -> list[Path]:
    """Small .dkv files: shrunk fixtures converted with every codec, appended (multi-segment)
    sessions, tiny synthetic ones, and two full-size fixture conversions."""
    from deltakv_format.operations import convert
    from deltakv_format.session import append_session, write_session

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    made = []
    codecs = ("raw", "f16", "q8_0", "q4_0", "delta-q4_0", "dkv-q4", "dkv-ans")
    for i, (name, state) in enumerate(small_fixture_states().items()):
        codec = codecs[i % len(codecs)]
        p = outdir / f"{name}_{codec}.dkv"
        _write_small_reserve(state, p, codec)
        made.append(p)
    small = FIXTURES / "smollm2_v10_2streams_fa1_seq1.seqstate"
    for codec in ("q8_0", "dkv-q4", "dkv-ans"):  # full size, default header reserve
        convert(small, outdir / f"seq1_{codec}.dkv", codec=codec)
        made.append(outdir / f"seq1_{codec}.dkv")
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.synthetic import SyntheticContext

    for codec in ("raw", "dkv-q4", "delta-q4_0", "dkv-ans"):
        ctx = SyntheticContext(n_max=120, n_layer=1, n_values=64, seed=5, ext_bytes=12 if codec == "raw" else 0)
        p = outdir / f"syn_append_{codec}.dkv"
        _write_small_reserve(ctx.state(20), p, codec)
        for n in (45, 70, 120):
            append_session(p, ctx.state(n))
        made.append(p)
    for name, state in synthetic_states().items():
        p = outdir / f"{name}.dkv"
        _write_small_reserve(state, p, "dkv-q4" if "f16" in name else "q8_0")
        made.append(p)
    return made


def make_state_seeds(outdir) -> list[Path]:
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    made = []
    for name, state in small_fixture_states().items():
        (outdir / f"{name}.bin").write_bytes(write_state(state))
        made.append(outdir / f"{name}.bin")
    for p in STATE_SEEDS[:2]:  # two full-size fixtures
        (outdir / p.name).write_bytes(p.read_bytes())
        made.append(outdir / p.name)
    for name, state in synthetic_states().items():
        (outdir / f"{name}.bin").write_bytes(write_state(state))
        made.append(outdir / f"{name}.bin")
    return made
