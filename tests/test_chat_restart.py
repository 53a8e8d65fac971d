"""A chat through DeltaKVCache asked before and after a real process restart (deltakv demo --chat).

The lossless guard: with the raw codec, the answer after the restart (the prompt served from the
.dkv in a new process) is token-identical to the answer of a fresh context without any cache.
Lossy settings are reported, not asserted: greedy answers flip at near-ties.
"""

import pytest

from deltakv_format.constants import DEFAULT_CODEC
from deltakv_tools.measure.chat_agreement import PROMPTS, RAW, codec_settings, measure_chat_agreement

from .llama_helpers import MODEL, needs_llama

pytestmark = [needs_llama, pytest.mark.llama]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-cache")
    return measure_chat_agreement(MODEL, PROMPTS[:3], folder=folder)


def test_the_settings_are_raw_the_default_codec_and_k_q8_0():
    settings = codec_settings()
    assert [(s.codec, s.k_codec) for s in settings] == [(RAW, None), (DEFAULT_CODEC, None), (DEFAULT_CODEC, "q8_0")]


def test_every_prompt_is_served_from_the_dkv_after_the_restart(measured):
    for setting in measured.settings:
        for answer in measured.answers[setting.label]:
            assert answer.hit, setting.label
            # The whole prompt came from the .dkv (llama-cpp-python evaluates its last token again).
            assert answer.served_tokens == answer.prompt_tokens > 100, setting.label
            assert answer.dkv_bytes > 0 and answer.after_tokens, setting.label


def test_raw_after_a_restart_answers_as_a_fresh_context_without_a_cache(measured):
    assert measured.lossless_guard() == [True] * 3, (measured.replayed, [a.after for a in measured.raw])
    for answer, uncached in zip(measured.raw, measured.replayed):
        assert answer.after == uncached


def test_the_lossy_settings_report_their_agreement_with_raw(measured, capsys):
    sizes = {s.label: sum(a.dkv_bytes for a in measured.answers[s.label]) for s in measured.settings}
    for setting in measured.settings[1:]:
        ag = measured.agreement(setting.label)
        assert ag["n"] == 3 and 0 <= ag["identical"] <= 3 and ag["hits"] == 3
        assert all(0 <= p <= n for p, n in zip(ag["common_prefix"], ag["raw_lengths"]))
        # identical answers share all their tokens, and only they do
        assert ag["per_prompt"] == [p == n == len(a.after_tokens) for p, n, a in
                                    zip(ag["common_prefix"], ag["raw_lengths"], measured.answers[setting.label])]
        assert sizes[setting.label] < sizes[RAW]
    table = measured.table(answers=True)
    assert all(s.label in table for s in measured.settings) and "lossless guard" in table
    with capsys.disabled():
        print("\n" + measured.table())


def test_demo_offers_the_chat_and_refuses_to_replace_its_folder(tmp_path):
    from click.testing import CliRunner

    from deltakv_tools.cli import main

    help_text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert "--chat" in help_text and "--model" in help_text
    (tmp_path / "chat-cache").mkdir()
    r = CliRunner().invoke(main, ["demo", "--chat", "--out-dir", str(tmp_path)])
    assert r.exit_code == 2 and "chat-cache exists; pass --force" in r.output
