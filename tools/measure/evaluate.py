"""``deltakv eval``: what a save/restore through each codec does to the model's next-token predictions.

For each model, text, prefix length and chunk (a different stretch of the text): evaluate the prefix
with an f16 cache, take llama.cpp's sequence state, pass it through a codec (a real .dkv written and read
back), load it into the same context, evaluate the next ``continuation`` tokens and compare their
logits with those of the untouched state: KL divergence, perplexity change, top-1 agreement.

Reference rows: llama.cpp's own quantized caches (``type_k``/``type_v`` q8_0 and q4_0: the whole
prefix and continuation evaluated with that cache) and an f16-noise floor (the f16 cache with a
fraction of its values moved by one f16 step), which says how much the model's outputs move when the
cache moves by no more than re-rounding would.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from deltakv_format.constants import GGMLType

from deltakv_format.codecs import get_codec
from deltakv_format.llama_state import parse_state, write_state
from deltakv_format.model_info import rope_params_of_state_layers
from deltakv_format.session import write_session
from deltakv_format.state_model import Framing, KVCacheSection, KVTensor

from .eval_rows import CODEC_ROWS, REFERENCE_ROWS, TABLE_ORDER, TRANSCODE_ROWS, TRANSCODE_VS_CACHE
from deltakv_runtime.session import seq_state_bytes, set_seq_state_bytes

NOISE_FRACTION = 0.0025  # a quarter percent of the values move by one f16 step


@dataclass
class Measurement:
    model: str
    text: str
    prefix: int
    chunk: int
    row: str
    bits_per_value: float
    ratio: float  # .dkv bytes / f16 state bytes (reference rows: cache bytes / f16 cache bytes)
    kl: float
    ppl_ref: float
    ppl: float
    top1: float
    continuation: int = 0  # tokens evaluated after the restore (KL and top-1 over all but the last)


@dataclass
class EvalConfig:
    models: dict[str, Path]
    texts: dict[str, str]
    prefixes: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    continuation: int = 256
    chunks: int = 3
    codec_rows: list = field(default_factory=lambda: list(CODEC_ROWS))
    reference_rows: list = field(default_factory=lambda: list(REFERENCE_ROWS))
    transcode_rows: list = field(default_factory=lambda: list(TRANSCODE_ROWS))


class _Decoder:
    """A llama.cpp context fed through llama_decode with logits for the tokens asked for."""

    def __init__(self, model_path: Path, n_ctx: int, cache_type: int | None = None):
        import llama_cpp
        from llama_cpp import Llama

        self.L = llama_cpp
        kwargs = {}
        if cache_type is not None:
            kwargs = {"type_k": cache_type, "type_v": cache_type}
        self.llm = Llama(str(model_path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=True,
                         verbose=False, **kwargs)
        self.n_vocab = self.llm.n_vocab()
        self.batch = self.L.llama_batch_init(512, 0, 1)

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.llm.close()

    def clear(self):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.llm.ctx), True)

    def decode(self, tokens, start: int, want_logits: bool) -> np.ndarray | None:
        out = []
        for lo in range(0, len(tokens), 512):
            part = tokens[lo:lo + 512]
            b = self.batch
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = int(tok)
                b.pos[i] = start + lo + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = want_logits
            rc = self.L.llama_decode(self.llm.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc})")
            if want_logits:
                ptr = self.L.llama_get_logits(self.llm.ctx)
                out.append(np.ctypeslib.as_array(ptr, shape=(len(part), self.n_vocab)).copy())
        return np.concatenate(out) if want_logits else None

    def set_seq_state(self, blob: bytes) -> None:
        n = set_seq_state_bytes(self.llm, blob, 0)
        if n != len(blob):
            raise RuntimeError(f"llama.cpp refused a restored state ({n} of {len(blob)} bytes)")


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def compare_logits(ref: np.ndarray, test: np.ndarray, next_tokens) -> tuple[float, float, float, float]:
    """(mean KL(ref || test), ppl of ref, ppl of test, top-1 agreement) over positions with a next token."""
    n = len(next_tokens)
    lr, lt = _log_softmax(ref[:n]), _log_softmax(test[:n])
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lt), axis=1)))
    idx = np.arange(n)
    ppl_ref = math.exp(-float(np.mean(lr[idx, next_tokens])))
    ppl = math.exp(-float(np.mean(lt[idx, next_tokens])))
    top1 = float(np.mean(ref[:n].argmax(axis=1) == test[:n].argmax(axis=1)))
    return kl, ppl_ref, ppl, top1


def _with_noise(state, fraction: float, rng: np.random.Generator):
    """The state with ``fraction`` of its f16 K/V values moved one f16 step up or down."""
    sections = []
    for sec in state.sections:
        if not isinstance(sec, KVCacheSection):
            sections.append(sec)
            continue
        streams = []
        for st in sec.streams:
            def nudge(t: KVTensor) -> KVTensor:
                if t.ggml_type != GGMLType.F16 or t.cell_count == 0:
                    return t
                bits = np.frombuffer(t.data, np.uint16).copy()
                pick = rng.random(bits.size) < fraction
                finite_nonzero = (bits & 0x7FFF) != 0
                pick &= finite_nonzero & ((bits & 0x7C00) != 0x7C00) & ((bits & 0x7FFF) != 0x7BFF)
                step = np.where(rng.random(bits.size) < 0.5, -1, 1).astype(np.int32)
                bits[pick] = (bits[pick].astype(np.int32) + step[pick]).astype(np.uint16)
                return replace(t, data=memoryview(bits.tobytes()))
            streams.append(replace(st, k=[nudge(t) for t in st.k], v=[nudge(t) for t in st.v]))
        sections.append(replace(sec, streams=streams))
    return replace(state, sections=sections)


def _kv_values(state) -> int:
    return sum(t.n_values * t.cell_count for sec in state.kv_sections for st in sec.streams for t in st.k + st.v)


def _through_codec(seq_blob: memoryview, codec_name: str, params: dict, tmp: Path, rope=None,
                   transcode: bool = False) -> tuple[bytes, float, float]:
    """seq state -> .dkv (written and read back) -> seq state; with bits/value and size ratio (to the
    state given). ``rope``: the model's rotary parameters (what the runtime passes), for codecs that
    use them. ``transcode``: write_session's (quantized caches coded through their values)."""
    state = parse_state(seq_blob, framing=Framing.SEQ_STATE)
    path = tmp / "eval.dkv"
    params = dict(params)
    if not params.pop("rope", True):
        rope = None
    per_role = {role: _codec_spec(params.pop(role, None)) for role in ("k_codec", "v_codec")}
    # by its id when it has no parameters: write_session gives it its defaults for each role
    codec = get_codec(codec_name, **params) if params else codec_name
    written = write_session(state, path, codec, rope=rope, transcode=transcode, **per_role)
    stored = written.stats()["kv_stored_bytes"]
    ratio = written.file_size / len(seq_blob)
    with written.open() as session:
        restored = session.to_llama_state()
    bits = 8 * stored / _kv_values(state)
    return write_state(restored), bits, ratio


def _codec_spec(spec):
    """A per-role codec of a row: None, a codec id, or (id, parameters)."""
    if isinstance(spec, (tuple, list)):
        return get_codec(spec[0], **spec[1])
    return spec


def run_eval(config: EvalConfig, log=print, on_run=None) -> list[Measurement]:
    """Every measurement of ``config``; ``on_run(results so far)`` after each run (text x prefix x chunk),
    so that a long evaluation leaves its partial results behind."""
    import llama_cpp

    results: list[Measurement] = []
    rng = np.random.default_rng(0)
    n_ctx = max(config.prefixes) + config.continuation + 8
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for model_name, model_path in config.models.items():
            f16 = _Decoder(model_path, n_ctx)
            rope = rope_params_of_state_layers(model_path, sequence=True)
            cache_types = {"q8_0": llama_cpp.GGML_TYPE_Q8_0, "q4_0": llama_cpp.GGML_TYPE_Q4_0}
            wanted = {name for name in cache_types if f"llama.cpp cache {name}" in config.reference_rows}
            wanted |= {cache for _, cache, _, _ in config.transcode_rows}
            quantized = {f"llama.cpp cache {name}": _Decoder(model_path, n_ctx, cache_types[name])
                         for name in cache_types if name in wanted}
            try:
                for text_name, text in config.texts.items():
                    tokens = f16.llm.tokenize(text.encode("utf-8"), add_bos=False)
                    for prefix in config.prefixes:
                        span = prefix + config.continuation
                        if len(tokens) < span:
                            log(f"skip {model_name}/{text_name}/{prefix}: text has {len(tokens)} tokens, needs {span}")
                            continue
                        starts = np.linspace(0, len(tokens) - span, config.chunks).astype(int)
                        for chunk, start in enumerate(starts):
                            t0 = time.time()
                            toks = tokens[start:start + span]
                            head, tail = toks[:prefix], toks[prefix:]
                            next_tokens = np.asarray(tail[1:])
                            f16.clear()
                            f16.decode(head, 0, False)
                            blob = bytes(seq_state_bytes(f16.llm, 0))
                            ref = f16.decode(tail, prefix, True)

                            def measure(row, restored_blob, bits, ratio):
                                f16.clear()
                                f16.set_seq_state(restored_blob)
                                test = f16.decode(tail, prefix, True)
                                kl, ppl_ref, ppl, top1 = compare_logits(ref, test, next_tokens)
                                results.append(Measurement(model_name, text_name, prefix, chunk, row, bits, ratio, kl, ppl_ref, ppl, top1,
                                                           len(tail)))

                            for label, codec_name, params in config.codec_rows:
                                restored, bits, ratio = _through_codec(memoryview(blob), codec_name, params, tmp, rope)
                                measure(label, restored, bits, ratio)
                            if "f16 noise floor" in config.reference_rows:
                                state = parse_state(memoryview(blob), framing=Framing.SEQ_STATE)
                                measure("f16 noise floor", write_state(_with_noise(state, NOISE_FRACTION, rng)), 16.0, 1.0)
                            for label, dec in quantized.items():
                                dec.clear()
                                dec.decode(head, 0, False)
                                cache_blob = bytes(seq_state_bytes(dec.llm, 0))
                                test = dec.decode(tail, prefix, True)
                                bits = 8.5 if "q8_0" in label else 4.5
                                if label in config.reference_rows:
                                    kl, ppl_ref, ppl, top1 = compare_logits(ref, test, next_tokens)
                                    results.append(Measurement(model_name, text_name, prefix, chunk, label, bits, bits / 16,
                                                               kl, ppl_ref, ppl, top1, len(tail)))
                                for row, cache, codec_name, params in config.transcode_rows:
                                    if label != f"llama.cpp cache {cache}":
                                        continue
                                    restored, row_bits, _ = _through_codec(memoryview(cache_blob), codec_name, params,
                                                                           tmp, rope, transcode=True)
                                    dkv_bytes = (tmp / "eval.dkv").stat().st_size
                                    dec.clear()
                                    dec.set_seq_state(restored)
                                    transcoded = dec.decode(tail, prefix, True)
                                    # KL vs f16 like every row; vs the cache's own logits: what --transcode costs
                                    for name, baseline in ((row, ref), (row + TRANSCODE_VS_CACHE, test)):
                                        kl, ppl_ref, ppl, top1 = compare_logits(baseline, transcoded, next_tokens)
                                        results.append(Measurement(model_name, text_name, prefix, chunk, name, row_bits,
                                                                   dkv_bytes / len(blob), kl, ppl_ref, ppl, top1, len(tail)))
                            log(f"{model_name} {text_name} prefix {prefix} chunk {chunk}: {time.time() - t0:.1f} s")
                            if on_run is not None:
                                on_run(results)
            finally:
                f16.close()
                for dec in quantized.values():
                    dec.close()
    return results


def _agg(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _ci95_half_width(values) -> float:
    """Half the 95% confidence interval of the mean (normal approximation)."""
    return 1.96 * _agg(values)[1] / math.sqrt(len(values))


def _row_labels(rows: list[Measurement]) -> list[str]:
    """The rows present, in table order (codec rows, then reference rows, then any others)."""
    order = TABLE_ORDER
    labels = [lab for lab in order if any(r.row == lab for r in rows)]
    return labels + sorted({r.row for r in rows} - set(labels))


def markdown_table(results: list[Measurement]) -> str:
    """One table per model: rows = codecs, mean +- standard deviation over every prefix and chunk."""
    lines = []
    for model in dict.fromkeys(r.model for r in results):
        rows = [r for r in results if r.model == model]
        texts = sorted({r.text for r in rows})
        prefixes = sorted({r.prefix for r in rows})
        n_runs = len({(r.text, r.prefix, r.chunk) for r in rows})
        lines.append(f"### {model}: texts {', '.join(texts)}; prefixes {', '.join(map(str, prefixes))}; "
                     f"{n_runs} runs (text x prefix x chunk) of {rows[0].continuation} continuation tokens each; "
                     "mean ± standard deviation over the runs")
        lines.append("")
        lines.append("| codec | bits/value | .dkv / f16 | KL vs f16 (± sd) | KL 95% CI of the mean | PPL change | "
                     "top-1 agreement |")
        lines.append("|---|---|---|---|---|---|---|")
        present = _row_labels(rows)
        for label in present:
            sel = [r for r in rows if r.row == label]
            bits = np.mean([r.bits_per_value for r in sel])
            ratio = np.mean([r.ratio for r in sel])
            kl, kl_sd = _agg([r.kl for r in sel])
            dppl, dppl_sd = _agg([100 * (r.ppl / r.ppl_ref - 1) for r in sel])
            top1, top1_sd = _agg([100 * r.top1 for r in sel])
            half = _ci95_half_width([r.kl for r in sel])
            lines.append(f"| {label} | {bits:.2f} | {ratio:.3f} | {kl:.4f} ± {kl_sd:.4f} | {kl - half:.4f} .. {kl + half:.4f} | "
                         f"{dppl:+.2f}% ± {dppl_sd:.2f} | "
                         f"{top1:.1f}% ± {top1_sd:.1f} |")
        lines.append("")
        lines.append(f"KL by prefix length ({model}, mean over texts and chunks):")
        lines.append("")
        lines.append("| codec | " + " | ".join(str(p) for p in prefixes) + " |")
        lines.append("|---|" + "---|" * len(prefixes))
        for label in present:
            cells = []
            for p in prefixes:
                sel = [r.kl for r in rows if r.row == label and r.prefix == p]
                cells.append(f"{np.mean(sel):.4f}" if sel else "-")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _paired_table(model, rows, present, PAIRED_BASELINE)
    return "\n".join(lines)


PAIRED_BASELINE = "llama.cpp cache q8_0"


def _paired_table(model: str, rows: list[Measurement], labels: list[str], baseline: str) -> list[str]:
    """Each row's KL minus the baseline's in the same run: the run-to-run spread (some stretches of
    text are harder than others for every codec) cancels, so smaller differences are resolved."""
    by_run: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_run.setdefault((r.text, r.prefix, r.chunk), {})[r.row] = r.kl
    lines = [f"KL minus {baseline}'s, paired by run ({model}): mean, 95% CI of the mean, runs above it", "",
             "| codec | KL - baseline | 95% CI | runs above |", "|---|---|---|---|"]
    for label in labels:
        diffs = np.array([v[label] - v[baseline] for v in by_run.values() if label in v and baseline in v])
        if label == baseline or len(diffs) < 2 or label.endswith(TRANSCODE_VS_CACHE):  # not a KL vs f16
            continue
        half = _ci95_half_width(diffs)
        lines.append(f"| {label} | {diffs.mean():+.4f} | {diffs.mean() - half:+.4f} .. {diffs.mean() + half:+.4f} | "
                     f"{int((diffs > 0).sum())} of {len(diffs)} |")
    return lines + [""]


def load_results(path: Path) -> list[Measurement]:
    import json

    return [Measurement(**r) for r in json.loads(Path(path).read_text())]


def plot(results: list[Measurement], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r.model for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r.model == model]
        labels = _row_labels(rows)
        colors = plt.cm.tab20(np.linspace(0, 1, 20))
        per_role = {label for label, _, params in CODEC_ROWS if {"k_codec", "v_codec"} & set(params)}
        for i, label in enumerate(labels):
            sel = [r for r in rows if r.row == label]
            bits = np.mean([r.bits_per_value for r in sel])
            kl = np.mean([r.kl for r in sel])
            sd = np.std([r.kl for r in sel])
            style = "s" if label in REFERENCE_ROWS else ("D" if label in per_role else "o")
            if label == "raw" or label.endswith(TRANSCODE_VS_CACHE):
                continue  # KL 0 cannot sit on a log axis; the other is not a KL vs f16
            ax.errorbar(bits, kl, yerr=sd, fmt=style, color=colors[i % 20], capsize=3, label=label)
        floor = [r.kl for r in rows if r.row == "f16 noise floor"]
        if floor:
            ax.axhline(np.mean(floor), color="gray", linestyle="--", linewidth=0.8)
        ax.axvline(5.0, color="gray", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("bits per K/V value")
        ax.set_ylabel("KL vs f16 (mean over runs)")
        ax.set_title(model)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
