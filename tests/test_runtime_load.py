"""deltakv_runtime.load with real llama.cpp: the context's size checked first, the state rebuilt in
one buffer (the same bytes as the typed path), restore streamed to the same bytes."""

import numpy as np
import pytest

from deltakv_format import operations
from deltakv_format.errors import SessionMismatchError
from deltakv_format.llama_state import write_state
from deltakv_format.session import DkvSession
from deltakv_format.state_model import Framing
from deltakv_tools.models import gemma3_270m

from .llama_helpers import make_llama, needs_llama, prompt_tokens

pytestmark = needs_llama


def _typed_bytes(path, framing=None):
    with DkvSession(path) as session:
        return write_state(session.to_llama_state(), framing=framing, tokens=session.tokens())


def test_a_session_larger_than_the_context_is_refused_first_naming_both_sizes(tmp_path):
    from deltakv_runtime import load, save
    from deltakv_runtime.session import seq_state_bytes

    big = make_llama(n_ctx=64)
    big.eval(prompt_tokens(big, 12))
    save(big, tmp_path / "s12.dkv")
    big.close()
    small = make_llama(n_ctx=8)
    small.eval(prompt_tokens(small, 3))
    before = bytes(seq_state_bytes(small)), small.n_tokens, np.array(small.input_ids)
    with pytest.raises(SessionMismatchError, match=r"12 tokens.*n_ctx = 8"):
        load(small, tmp_path / "s12.dkv")
    assert (bytes(seq_state_bytes(small)), small.n_tokens) == before[:2]
    assert np.array_equal(small.input_ids, before[2])
    small.close()


def _live_session(tmp_path, llm, n):
    from deltakv_runtime import save

    llm.eval(prompt_tokens(llm, n))
    path = tmp_path / "live.dkv"
    save(llm, path)  # the default codec: dkv-ans with the model's rotary parameters
    return path


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
@pytest.mark.parametrize("flash_attn", [True, False])
def test_load_and_restore_give_the_typed_paths_bytes(tmp_path, model, flash_attn):
    from llama_cpp import Llama

    from deltakv_runtime import load
    from deltakv_runtime.session import seq_state_bytes

    if model == "gemma3":
        if gemma3_270m() is None:
            pytest.skip("needs Gemma 3 270M")

        def make(n_ctx):
            return Llama(str(gemma3_270m()), n_ctx=n_ctx, flash_attn=flash_attn, verbose=False, seed=1)
    else:
        def make(n_ctx):
            return make_llama(n_ctx=n_ctx, flash_attn=flash_attn)
    llm = make(512)
    path = _live_session(tmp_path, llm, 300)
    llm.close()
    # restore, streamed, writes exactly the typed path's bytes
    operations.restore(path, tmp_path / "out.ggsq")
    assert (tmp_path / "out.ggsq").read_bytes() == _typed_bytes(path)
    # load rebuilds into one buffer: llama.cpp then holds exactly the typed path's state
    fresh = make(512)
    seconds = {}
    assert load(fresh, path, seconds=seconds) == 300
    assert set(seconds) == {"open", "read", "decode", "set_data"}
    assert bytes(seq_state_bytes(fresh)) == _typed_bytes(path, Framing.SEQ_STATE)
    fresh.close()
