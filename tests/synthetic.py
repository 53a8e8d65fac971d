"""Small hand-built llama.cpp states for tests that need no model (real fixtures live in fixtures/)."""

import struct

import numpy as np

from deltakv_format.constants import GGMLType
from deltakv_format.state_model import BodyLayout, Framing, KVCacheSection, KVStream, KVTensor, LlamaState


class SyntheticContext:
    """The K/V values of a growing context: ``state(n)`` is its state after n tokens."""

    def __init__(self, n_max=300, n_layer=3, n_values=128, ggml_type=GGMLType.F16, v_trans=1, seed=0, ext_bytes=0):
        rng = np.random.default_rng(seed)
        dtype = {GGMLType.F16: np.float16, GGMLType.F32: np.float32}[ggml_type]
        self.k = [(np.cumsum(rng.standard_normal((n_max, n_values)) * 0.2, axis=0)).astype(dtype) for _ in range(n_layer)]
        self.v = [rng.standard_normal((n_max, n_values)).astype(dtype) for _ in range(n_layer)]
        self.ggml_type, self.n_values, self.v_trans, self.ext_bytes = ggml_type, n_values, v_trans, ext_bytes
        self.tokens = rng.integers(0, 49152, n_max).astype("<i4")

    def state(self, n, framing=Framing.SESSION_FILE) -> LlamaState:
        cells = b"".join(struct.pack("<iI", i, 1) + b"\x07" * self.ext_bytes + struct.pack("<i", 0) for i in range(n))
        ks = [KVTensor(self.ggml_type, n, self.n_values, False, memoryview(k[:n].tobytes())) for k in self.k]
        vs = [
            KVTensor(self.ggml_type, n, self.n_values, bool(self.v_trans),
                     memoryview(np.ascontiguousarray(v[:n].T if self.v_trans else v[:n]).tobytes()))
            for v in self.v
        ]
        stream = KVStream(n, memoryview(cells), self.ext_bytes, self.v_trans, len(ks), None, ks, vs)
        token_words = memoryview(self.tokens[:n].tobytes()) if framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE) else None
        return LlamaState(
            framing=framing, layout=BodyLayout.V10, file_version=10 if framing == Framing.SESSION_FILE else None,
            token_words=token_words, seq_prefix_id=None, arch="llama" if framing != Framing.SEQ_STATE else None,
            arch_bytes=b"llama" if framing != Framing.SEQ_STATE else None,
            sections=[KVCacheSection(True, [stream])],
        )


def payloads(state: LlamaState) -> list[bytes]:
    return [bytes(t.data) for sec in state.kv_sections for st in sec.streams for t in st.k + st.v]


def same_state(a: LlamaState, b: LlamaState, *, payload=True) -> bool:
    sa, sb = a.kv_sections[0].streams[0], b.kv_sections[0].streams[0]
    ok = bytes(sa.cells) == bytes(sb.cells) and sa.cell_count == sb.cell_count
    ok &= (a.tokens() is None and b.tokens() is None) or np.array_equal(a.tokens(), b.tokens())
    return ok and (not payload or payloads(a) == payloads(b))
