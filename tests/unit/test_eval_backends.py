"""Backends without a model: log-likelihood arithmetic (hand-checked), endpoint echo parsing."""

from __future__ import annotations

from types import SimpleNamespace

from corral.eval.backends import EndpointBackend, LocalBackend
from corral.outputs import CompletionOutput, RequestOutput
from corral.sampling_params import SamplingParams


class CharTokenizer:
    """One token per character, BOS = 1 when special tokens are added."""

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


class FakeLLM:
    """prompt_logprobs[i] gives the token at position i the log-prob -i/10 (and a decoy)."""

    tokenizer = CharTokenizer()

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        outs = []
        for ids in prompts:
            lps = [None] + [{ids[i]: -i / 10, 7: -9.0} for i in range(1, len(ids))]
            outs.append(RequestOutput("r", None, ids, [CompletionOutput(0, "x", [5])], True,
                                      prompt_logprobs=lps))
        return outs


def test_local_continuation_logprobs_hand_checked():
    llm = FakeLLM()
    backend = LocalBackend(llm, "fake")
    # Context "Q:" -> ids [1, 81, 58] (positions 0-2); " A" adds positions 3, 4;
    # " BB" adds positions 3, 4, 5.
    scores = backend.continuation_logprobs("Q:", [" A", " BB"])
    assert scores[0][1] == 2 and abs(scores[0][0] - (-0.3 - 0.4)) < 1e-9
    assert scores[1][1] == 3 and abs(scores[1][0] - (-0.3 - 0.4 - 0.5)) < 1e-9
    prompts, params = llm.calls[0]
    assert prompts == [[1, 81, 58, 32, 65], [1, 81, 58, 32, 66, 66]]
    assert params.max_tokens == 1 and params.prompt_logprobs == 0


def test_local_backend_is_lazy():
    backend = LocalBackend.load("no-such-model-is-loaded-yet")
    assert backend.name == "no-such-model-is-loaded-yet" and backend._llm is None


def test_endpoint_echo_logprobs_pick_the_continuation():
    backend = EndpointBackend("http://127.0.0.1:9/v1", model="m")
    context = "Question: 2+2?\nAnswer:"
    # Tokens of context + " 4" as a server echoes them, plus one generated token at the end.
    tokens = ["Question", ":", " 2", "+", "2", "?\n", "Answer", ":", " 4", "!"]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    lps = [None, -1.0, -2.0, -1.0, -1.0, -1.0, -3.0, -0.5, -0.25, -7.0]
    seen = {}

    def create(**kw):
        seen.update(kw)
        logprobs = SimpleNamespace(tokens=tokens, token_logprobs=lps, text_offset=offsets)
        return SimpleNamespace(choices=[SimpleNamespace(logprobs=logprobs)],
                               usage=SimpleNamespace(prompt_tokens=9))

    backend.client = SimpleNamespace(completions=SimpleNamespace(create=create))
    assert backend.continuation_logprobs(context, [" 4"]) == [(-0.25, 1)]
    assert seen["echo"] is True and seen["prompt"] == context + " 4" and seen["logprobs"] == 0


def test_endpoint_request_kwargs():
    kw = EndpointBackend._request_kwargs(SamplingParams(temperature=0, max_tokens=9, top_k=5,
                                                         stop=["###"]))
    assert kw["temperature"] == 0 and kw["max_tokens"] == 9 and kw["stop"] == ["###"]
    assert kw["extra_body"] == {"top_k": 5}
    assert "seed" not in kw


class ChatLLM:
    """chat() fails for a whole batch when any conversation says BAD (as an engine raising on
    one over-long prompt would)."""

    def chat(self, conversations, params, use_tqdm=True):
        if any("BAD" in c[-1]["content"] for c in conversations):
            raise ValueError("prompt is longer than max_model_len")
        return [RequestOutput("r", None, [1], [CompletionOutput(0, "ok " + c[-1]["content"],
                                                                [5, 6], finish_reason="stop")],
                              True) for c in conversations]


def test_local_chat_isolates_a_failing_question():
    backend = LocalBackend(ChatLLM(), "fake")
    convs = [[{"role": "user", "content": t}] for t in ("a", "BAD", "b")]
    done = []
    replies = backend.chat(convs, SamplingParams(max_tokens=4), done.append)
    assert [r.text for r in replies] == ["ok a", "", "ok b"]
    assert replies[1].error == "ValueError: prompt is longer than max_model_len"
    assert replies[0].completion_tokens == 2 and replies[0].finish_reason == "stop"
    assert sum(done) == 3
