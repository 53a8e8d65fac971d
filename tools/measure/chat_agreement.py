"""A chat through ``DeltaKVCache`` before and after a process restart: do the answers stay the same?

For each codec setting (``raw``, the default codec, and ``--k-codec q8_0`` with the default for V),
and each (document, question) prompt:

1. a child process loads the model, sets ``DeltaKVCache(folder, llm=llm, codec=...)`` and asks the
   question with ``create_chat_completion`` (temperature 0): a miss, and llama-cpp-python stores the
   prompt's state as a ``.dkv``;
2. a second child process (a real restart: a new interpreter, a new ``Llama``) asks the same
   messages over the same folder: the prompt is served from the ``.dkv`` (the cache counts the hit
   and how many prompt tokens the served state held).

The first child also answers every prompt without any cache (the reference of the lossless guard:
``raw``'s answer after the restart must be that one). Each lossy setting's answer after the restart
is compared with ``raw``'s after the restart: token-identical or not, and the length of the common
prefix. This is a guard in a user's terms, not the quality measure (that is ``deltakv eval``):
greedy answers flip at near-ties, so one differing answer says little about a codec.

    from deltakv_tools.measure.chat_agreement import measure_chat_agreement
    result = measure_chat_agreement(model_path)   # every prompt of PROMPTS
    print(result.table())
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deltakv_format.constants import DEFAULT_CODEC

from .texts import TEXTS

N_CTX = 2048
MAX_TOKENS = 48
SEED = 1
RAW = "raw"


# ---- prompts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    """A question about an excerpt of one of the shipped texts (``texts.TEXTS``): the excerpt starts
    at the line holding ``start`` and runs for whole lines up to about ``chars`` characters."""

    text: str  # a key of texts.TEXTS
    start: str
    chars: int
    question: str

    def document(self) -> str:
        full = TEXTS[self.text]()
        lines = full.splitlines(keepends=True)
        first = next(i for i, line in enumerate(lines) if self.start in line)
        out, n = [], 0
        for line in lines[first:]:
            if n + len(line) > self.chars and out:
                break
            out.append(line)
            n += len(line)
        return "".join(out).strip("\n")

    def messages(self) -> list[dict]:
        kind = "source code" if self.text == "code" else "text"
        return [{"role": "user", "content": f"Read this {kind}:\n\n{self.document()}\n\n"
                                            f"Answer in one or two sentences. {self.question}"}]


PROMPTS: tuple[ChatPrompt, ...] = (
    ChatPrompt("prose", "The GNU General Public License is a free, copyleft", 1500,
               "What kind of license is the GNU General Public License, and what does it guarantee?"),
    ChatPrompt("prose", "When we speak of free software", 1100,
               "Does free software refer to price? What must you do when you distribute copies?"),
    ChatPrompt("code", "void llama_kv_cache::clear(bool data)", 1500,
               "What does the function seq_rm do with p0 and p1 when they are negative?"),
    ChatPrompt("prose", "Developers that use the GNU GPL protect your rights", 1300,
               "What are the two steps developers use to protect the users' rights?"),
    ChatPrompt("code", "void llama_kv_cache::state_write(", 1500,
               "What does state_write write first, and what does it do for each stream?"),
    ChatPrompt("prose", "0. Definitions.", 1400,
               'What does it mean to "convey" a work, according to these definitions?'),
    ChatPrompt("code", "void llama_kv_cache::seq_keep(", 1500,
               "What does seq_keep do to the cells of other sequences?"),
    ChatPrompt("prose", "Some devices are designed to deny users access", 1200,
               "What practice does this paragraph describe, and how does GPLv3 respond to it?"),
)


# ---- codec settings --------------------------------------------------------------------


@dataclass(frozen=True)
class CodecSetting:
    label: str
    codec: str
    k_codec: str | None = None


def codec_settings(codec: str = DEFAULT_CODEC) -> tuple[CodecSetting, ...]:
    """raw (the lossless reference), ``codec`` (the project's default unless given), and K in q8_0
    with ``codec`` for V (``--k-codec q8_0``)."""
    return (CodecSetting(RAW, RAW), CodecSetting(codec, codec), CodecSetting(f"K q8_0, V {codec}", codec, "q8_0"))


# ---- the child processes ---------------------------------------------------------------


def _counting_cache_class():
    from deltakv_runtime import DeltaKVCache
    from llama_cpp.llama import Llama

    class CountingCache(DeltaKVCache):
        """Counts the states it serves and how many tokens of the asked key they hold."""

        hits = 0
        served_tokens = 0

        def __getitem__(self, key):
            state = super().__getitem__(key)
            self.hits += 1
            held = list(state.input_ids[: state.n_tokens])
            self.served_tokens = max(self.served_tokens, Llama.longest_token_prefix(held, list(key)))
            return state

    return CountingCache


def _answer(llm, messages, max_tokens: int, *, replay_last: list[int] | None = None) -> tuple[str, list[int], int]:
    """A greedy chat answer from an empty context (so that a cache hit is loaded, never a reused prefix).

    ``replay_last``: the prompt's tokens; all but the last are evaluated first, so that the answer
    is computed as in a context restored from a cache (llama-cpp-python evaluates the prompt's last
    token again, alone, after loading a state that holds the whole prompt)."""
    llm.reset()
    if replay_last:
        llm.eval(replay_last[:-1])
    out = llm.create_chat_completion(messages, temperature=0, max_tokens=max_tokens, seed=SEED)
    text = out["choices"][0]["message"]["content"] or ""
    return text, [int(t) for t in llm.tokenize(text.encode(), add_bos=False, special=False)], int(
        out["usage"]["prompt_tokens"])


def _phase(request: dict) -> dict:
    """One process: a fresh Llama answers every (setting, prompt) over its own cache folder."""
    import os

    from llama_cpp import Llama

    CountingCache = _counting_cache_class()
    llm = Llama(request["model"], n_ctx=request["n_ctx"], flash_attn=True, seed=SEED, verbose=False,
                **({"n_threads": request["n_threads"]} if request["n_threads"] else {}))
    result: dict = {"baseline": [], "answers": {}}
    t0 = time.perf_counter()
    if request["baseline"]:
        llm.set_cache(None)
        for messages in request["messages"]:
            text, tokens, n_prompt = _answer(llm, messages, request["max_tokens"])
            prompt = [int(t) for t in llm.input_ids[:n_prompt]]
            replayed, replayed_tokens, _ = _answer(llm, messages, request["max_tokens"], replay_last=prompt)
            result["baseline"].append({"text": text, "tokens": tokens, "replayed": replayed,
                                       "replayed_tokens": replayed_tokens})
    for setting in request["settings"]:
        rows = []
        for i, messages in enumerate(request["messages"]):
            folder = Path(request["folder"]) / setting["label"].replace(" ", "_").replace(",", "") / f"prompt{i}"
            folder.mkdir(parents=True, exist_ok=True)
            cache = CountingCache(folder, llm=llm, codec=setting["codec"], k_codec=setting["k_codec"])
            llm.set_cache(cache)
            try:
                text, tokens, n_prompt = _answer(llm, messages, request["max_tokens"])
            finally:
                llm.set_cache(None)
            rows.append({"text": text, "tokens": tokens, "hits": cache.hits, "served_tokens": cache.served_tokens,
                         "prompt_tokens": n_prompt,
                         "dkv_bytes": sum(os.path.getsize(p) for p in folder.glob("*.dkv"))})
        result["answers"][setting["label"]] = rows
    result["seconds"] = time.perf_counter() - t0
    llm.close()
    return result


def _in_child(request: dict) -> dict:
    """Run one phase in a new interpreter (spawn: nothing of this process is inherited)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_phase, request).result()


# ---- the measurement -------------------------------------------------------------------


@dataclass
class ChatAnswer:
    """One prompt under one setting: the answer before the restart (it stored the prompt) and after
    (the prompt served from the .dkv)."""

    before: str
    after: str
    before_tokens: list[int]
    after_tokens: list[int]
    hit: bool  # the second process was served a state from the .dkv
    served_tokens: int  # prompt tokens the served state held (the rest, at least one, is evaluated)
    prompt_tokens: int
    dkv_bytes: int  # the folder's .dkv files after the first process


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class ChatAgreement:
    model: str
    prompts: list[ChatPrompt]
    settings: list[CodecSetting]
    baseline: list[str]  # each prompt's answer without any cache (first process), the prompt in one batch
    baseline_tokens: list[list[int]]
    # ... and with the prompt's last token evaluated alone, as a context restored from a cache does
    replayed: list[str]
    replayed_tokens: list[list[int]]
    answers: dict[str, list[ChatAnswer]]  # by setting label, one per prompt
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def raw(self) -> list[ChatAnswer]:
        return self.answers[RAW]

    def lossless_guard(self) -> list[bool]:
        """Per prompt: raw's answer after the restart is token-identical to the answer without a cache
        computed along the path a restored context takes (the prompt's last token evaluated alone)."""
        return [a.after_tokens == b for a, b in zip(self.raw, self.replayed_tokens)]

    def replay_effect(self) -> list[bool]:
        """Per prompt: without any cache, the answer is the same whether the prompt's last token is
        evaluated in the prompt's batch or alone (llama.cpp's numerics, not deltakv's)."""
        return [a == b for a, b in zip(self.baseline_tokens, self.replayed_tokens)]

    def agreement(self, label: str) -> dict:
        """The setting's answers after the restart against raw's after the restart."""
        same, prefixes = [], []
        for a, r in zip(self.answers[label], self.raw):
            same.append(a.after_tokens == r.after_tokens)
            prefixes.append(common_prefix(a.after_tokens, r.after_tokens))
        return {"identical": sum(same), "n": len(same), "per_prompt": same, "common_prefix": prefixes,
                "raw_lengths": [len(r.after_tokens) for r in self.raw],
                "hits": sum(a.hit for a in self.answers[label])}

    def table(self, *, answers: bool = False) -> str:
        n = len(self.prompts)
        lines = [f"chat through DeltaKVCache, asked before and after a process restart: {self.model}, "
                 f"{n} prompts, temperature 0, up to {MAX_TOKENS} tokens",
                 f"{'stored as':<22} {'served after restart':>20} {'same answer as raw':>19} "
                 f"{'common prefix with raw':>25} {'.dkv/prompt':>12}"]
        for s in self.settings:
            ag = self.agreement(s.label)
            rows = self.answers[s.label]
            served = f"{ag['hits']}/{n}"
            kib = sum(r.dkv_bytes for r in rows) / n / 1024
            if s.label == RAW:
                same = "(reference)"
                prefix = "-"
            else:
                same = f"{ag['identical']}/{n}"
                prefix = f"{sum(ag['common_prefix'])}/{sum(ag['raw_lengths'])} tokens"
            lines.append(f"{s.label:<22} {served:>20} {same:>19} {prefix:>25} {kib:>8.0f} KiB")
        guard = self.lossless_guard()
        lines.append(f"lossless guard: raw after the restart = no cache in {sum(guard)}/{n} answers "
                     "(the prompt's last token evaluated alone in both, as llama-cpp-python does after a cache hit)")
        shared = sum(common_prefix(a, b) for a, b in zip(self.baseline_tokens, self.replayed_tokens))
        lines.append(f"for scale, without a cache, that last token in the prompt's batch instead: the same answer in "
                     f"{sum(self.replay_effect())}/{n}, common prefix {shared}/{sum(map(len, self.replayed_tokens))} "
                     "tokens (llama.cpp's numerics, no .dkv involved)")
        lines.append("(a guard in a user's terms, not the quality measure: greedy answers flip at near-ties; "
                     "see deltakv eval)")
        if answers:
            for i, p in enumerate(self.prompts):
                lines.append(f"[{i + 1}] {p.question}")
                for s in self.settings:
                    a = self.answers[s.label][i]
                    mark = "" if s.label == RAW else (
                        " (= raw)" if a.after_tokens == self.raw[i].after_tokens
                        else f" (differs from raw after {common_prefix(a.after_tokens, self.raw[i].after_tokens)} tokens)")
                    lines.append(f"    {s.label}{mark}: {a.after.strip()!r}")
        return "\n".join(lines)


def measure_chat_agreement(model, prompts=PROMPTS, *, codec: str = DEFAULT_CODEC, settings=None,
                           n_ctx: int = N_CTX, max_tokens: int = MAX_TOKENS, n_threads: int | None = None,
                           folder: Path | None = None, log=None) -> ChatAgreement:
    """Ask each prompt through DeltaKVCache in one process, then again in a new one; see the module.

    ``model`` is a GGUF path; ``settings`` defaults to :func:`codec_settings` of ``codec``. The
    cache folders go under ``folder`` (default: a temporary folder, removed afterwards)."""
    prompts = list(prompts)
    settings = list(settings or codec_settings(codec))
    if settings[0].label != RAW:
        raise ValueError("the first setting must be raw: the others are compared with it")
    log = log or (lambda m: None)
    with tempfile.TemporaryDirectory(prefix="deltakv-chat-") as tmp:
        root = Path(folder) if folder is not None else Path(tmp)
        request = {"model": str(model), "n_ctx": n_ctx, "max_tokens": max_tokens, "n_threads": n_threads,
                   "messages": [p.messages() for p in prompts], "folder": str(root),
                   "settings": [{"label": s.label, "codec": s.codec, "k_codec": s.k_codec} for s in settings]}
        t = time.perf_counter()
        log(f"process 1: {len(prompts)} prompts without a cache, then through the cache of each setting (stores them)")
        first = _in_child({**request, "baseline": True})
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        log("process 2: the same prompts, served from the .dkv files")
        second = _in_child({**request, "baseline": False})
        t2 = time.perf_counter() - t
    answers = {}
    for s in settings:
        rows = []
        for b, a in zip(first["answers"][s.label], second["answers"][s.label]):
            if b["hits"]:
                raise RuntimeError(f"{s.label}: the first process was served from an empty cache folder")
            rows.append(ChatAnswer(before=b["text"], after=a["text"], before_tokens=b["tokens"], after_tokens=a["tokens"],
                                   hit=a["hits"] > 0, served_tokens=a["served_tokens"], prompt_tokens=a["prompt_tokens"],
                                   dkv_bytes=b["dkv_bytes"]))
        answers[s.label] = rows
    return ChatAgreement(model=Path(model).name, prompts=prompts, settings=settings,
                         baseline=[b["text"] for b in first["baseline"]],
                         baseline_tokens=[b["tokens"] for b in first["baseline"]],
                         replayed=[b["replayed"] for b in first["baseline"]],
                         replayed_tokens=[b["replayed_tokens"] for b in first["baseline"]], answers=answers,
                         seconds={"first_process": t1, "second_process": t2})
