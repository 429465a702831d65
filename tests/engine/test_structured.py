"""Guided decoding in the engine: every constrained output matches its constraint (the tiny random model writes
noise, so only the grammar can make it valid), an unconstrained neighbour's greedy output is unchanged, NEXTN
verification respects the grammar (greedy outputs equal plain decoding, drafts wrong or right), bad specs are
ValueErrors naming the problem, and masks are exact."""

import json
import re

import pytest
import torch
from schema_check import SCHEMAS, validate

from nextserve import LLM, SamplingParams, StructuredOutput
from nextserve.engine.spec_decode import SpecDecoder
from nextserve.engine.structured import GrammarError, apply_token_bitmask, unpack_bitmask


def make(path, k=None, **kw):
    kw.setdefault("cpu_cache_bytes", 64 << 20)
    if k:
        kw.update(speculative_algorithm="NEXTN", speculative_num_steps=k, speculative_adaptive=False)
    return LLM(model=str(path), dtype="float32", device="cpu", disable_tqdm=True, **kw)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return make(tiny_model_dir)


def sampled(spec, seed, max_tokens=400, **kw):
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured=spec, **kw)


def test_unpack_and_apply_bitmask_are_exact():
    g = torch.Generator().manual_seed(0)
    vocab = 1344 - 7  # not a multiple of 32: the last word is partly padding
    bitmask = torch.randint(-(2**31), 2**31 - 1, (5, -(-vocab // 32)), dtype=torch.int32, generator=g)
    want = torch.tensor([[(int(bitmask[r, i // 32]) >> (i % 32)) & 1 for i in range(vocab)] for r in range(5)]) == 1
    assert torch.equal(unpack_bitmask(bitmask, vocab), want)
    logits = torch.randn(5, vocab, generator=g)
    out = logits.clone()
    apply_token_bitmask(out, bitmask)  # CPU: xgrammar's kernel; elsewhere the unpack above
    assert torch.equal(out, logits.masked_fill(~want, float("-inf")))


@pytest.mark.parametrize("schema", range(len(SCHEMAS)))
def test_json_schema_outputs_validate(llm, schema):
    spec = StructuredOutput(json=SCHEMAS[schema])
    outs = llm.generate(["ROMEO:", "Speak, fool", "x"] * 2, [sampled(spec, seed) for seed in range(6)])
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        validate(json.loads(c.text), SCHEMAS[schema])


def test_regex_choice_json_object_grammar(llm):
    cases = [
        (StructuredOutput(regex=r"[A-Z][a-z]{1,6}-\d{2,3}"), lambda t: re.fullmatch(r"[A-Z][a-z]{1,6}-\d{2,3}", t)),
        (
            StructuredOutput(choice=["yes", "no", 'a "quoted"\nchoice']),
            lambda t: t in ("yes", "no", 'a "quoted"\nchoice'),
        ),
        (StructuredOutput(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (StructuredOutput(grammar='root ::= "<" [a-c]+ ">" ("!" | "?")'), lambda t: re.fullmatch(r"<[a-c]+>[!?]", t)),
    ]
    for spec, ok in cases:
        # json_object has no bound on its size: a cap, and only finished outputs are checked for that one.
        outs = llm.generate(["ROMEO:"] * 4, [sampled(spec, s, max_tokens=200) for s in range(4)])
        for o in outs:
            c = o.outputs[0]
            if spec.json_object and c.finish_reason == "length":
                continue
            assert c.finish_reason == "stop" and ok(c.text), (spec.kind, c.text)


def test_unconstrained_neighbour_is_unchanged(llm):
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    constrained = SamplingParams(temperature=0, max_tokens=120, structured=StructuredOutput(json=SCHEMAS[0]))
    prompts = ["ROMEO:", "JULIET: O", "Speak, fool", "x"]
    alone_plain = [llm.generate([p], plain)[0].outputs[0].token_ids for p in prompts]
    alone_json = [llm.generate([p], constrained)[0].outputs[0].token_ids for p in prompts]
    mixed = llm.generate(prompts * 2, [plain] * 4 + [constrained] * 4)
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone_plain
    assert [o.outputs[0].token_ids for o in mixed[4:]] == alone_json
    assert alone_json != alone_plain
    llm.engine.check_integrity()


def test_start_after_leaves_the_output_free_until_that_token(llm):
    """The server's thinking rule end to end: the unconstrained greedy output up to (and with) the start token is
    unchanged, and what follows matches the constraint. The start token is one the model writes by itself."""
    tok = llm.engine.tokenizer
    free = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    i, t = next(
        (i, t)
        for i, t in enumerate(free.token_ids)
        if i >= 2 and tok.encode(tok.decode([t]), add_special_tokens=False) == [t]
    )
    spec = StructuredOutput(choice=["yes", "no"], start_after=tok.decode([t]))
    c = llm.generate(["ROMEO:"], SamplingParams(temperature=0, max_tokens=40, structured=spec))[0].outputs[0]
    first = free.token_ids.index(t)  # the first occurrence starts the grammar
    assert c.token_ids[: first + 1] == free.token_ids[: first + 1]
    rest = tok.decode(c.token_ids[first + 1 :], skip_special_tokens=True)
    assert rest.lstrip("\n") in ("yes", "no") and len(rest) <= len(rest.lstrip("\n")) + 2 and c.finish_reason == "stop"
    assert i >= first


def test_n_samples_each_have_a_matcher(llm):
    spec = StructuredOutput(json=SCHEMAS[0])
    out = llm.generate(["ROMEO:"], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=200, structured=spec))[0]
    texts = [c.text for c in out.outputs]
    for text in texts:
        validate(json.loads(text), SCHEMAS[0])
    assert len(set(texts)) > 1


def test_grammar_end_finishes_even_with_ignore_eos(llm):
    p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, structured=StructuredOutput(choice=["yes"]))
    c = llm.generate(["ROMEO:"], p)[0].outputs[0]
    assert c.finish_reason == "stop" and c.text == "yes"


@pytest.mark.parametrize(
    "spec, words",
    [
        (StructuredOutput(json={"type": "objectx"}), "objectx"),
        (StructuredOutput(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere"),
        (StructuredOutput(regex="(ab"), "parenthesis"),
        (StructuredOutput(grammar="root ::= undefined_rule"), "undefined_rule"),
        (StructuredOutput(choice=["a"], start_after="two words"), "one token"),
    ],
)
def test_bad_specs_are_value_errors_naming_the_problem(llm, spec, words):
    with pytest.raises(ValueError, match=re.escape(words)) as e:
        llm.engine.add_request("bad", "ROMEO:", SamplingParams(structured=spec))
    assert isinstance(e.value, GrammarError)
    assert "bad" not in llm.engine.requests


def test_cache_shares_compilations(llm):
    cache = llm.engine.grammars
    a = StructuredOutput(json={"type": "object", "properties": {"x": {}, "y": {}}})
    assert cache.submit(a) is cache.submit(StructuredOutput(json=dict(a.json)))
    assert cache.submit(a) is not cache.submit(
        StructuredOutput(json={"type": "object", "properties": {"y": {}, "x": {}}})
    )
    bad = StructuredOutput(regex="(")
    first = cache.submit(bad)
    with pytest.raises(GrammarError):
        first.result()
    assert cache.submit(bad) is not first  # failures are forgotten


def _allowed(state, pending=()):
    bitmask = torch.full((1, 42), -1, dtype=torch.int32)
    state.fill(bitmask, 0, pending)
    return unpack_bitmask(bitmask, 1344)[0]


def test_fill_with_drafts_rolls_back_and_start_after(llm):
    tok = llm.engine.tokenizer
    spec = StructuredOutput(choice=["ab", "ac"], start_after="</think>")
    llm.engine.grammars.get(spec)
    state = llm.engine.grammars.new_state(spec)
    think_end = tok.convert_tokens_to_ids("</think>")
    assert _allowed(state).all()  # free until </think>
    assert state.accept(tok.encode("xyz")[0])
    assert _allowed(state).all()
    first = _allowed(state, [think_end])  # a draft </think>: constrained from there (up to two newlines first)
    assert not first.all() and first[tok.encode("a")[0]] and first[tok.encode("\n")[0]]
    assert not first[tok.encode("b")[0]]
    assert state.accept(think_end) and torch.equal(_allowed(state), first)
    a = tok.encode("a")[0]
    after_a = _allowed(state, [a])
    assert torch.equal(_allowed(state), first)  # the draft was rolled back
    assert state.accept(a) and torch.equal(_allowed(state), after_a)
    assert _allowed(state, [tok.encode("z")[0]]).all()  # a refused draft: row unused, left all ones
    assert torch.equal(_allowed(state), after_a)


@pytest.fixture(scope="module")
def greedy_json(tiny_mtp_model_dir):
    params = SamplingParams(temperature=0, max_tokens=200, structured=StructuredOutput(json=SCHEMAS[1]))
    outs = make(tiny_mtp_model_dir).generate(["ROMEO:", "JULIET: O", "x"], params)
    return params, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("k", [1, 3])
def test_nextn_greedy_equals_plain_with_grammar(tiny_mtp_model_dir, greedy_json, k):
    params, want = greedy_json
    llm = make(tiny_mtp_model_dir, k=k)
    outs = llm.generate(["ROMEO:", "JULIET: O", "x"], params)
    assert [o.outputs[0].token_ids for o in outs] == want
    for o in outs:
        validate(json.loads(o.outputs[0].text), SCHEMAS[1])
    assert llm.engine.spec.stats.drafted > 0


@pytest.mark.parametrize("wrong_at", [None, 0, 1])
def test_nextn_oracle_drafts_accepted_and_rejected(tiny_mtp_model_dir, greedy_json, monkeypatch, wrong_at):
    """Drafts are the plain output's continuation (all accepted), or have one wrong token (often outside the
    grammar): the matcher must roll back exactly, and the output must not change."""
    params, want = greedy_json
    by_prompt = {}

    def propose(self, seqs, last_hidden, k):
        for seq in seqs:
            ref = by_prompt[tuple(seq.token_ids[: seq.num_prompt])]
            done = len(seq.output_ids)
            draft = list(ref[done : done + k])
            if wrong_at is not None and len(draft) > wrong_at:
                draft[wrong_at] = (draft[wrong_at] + 1) % 1200
            seq.draft, seq.draft_probs = draft, None

    monkeypatch.setattr(SpecDecoder, "propose", propose)
    llm = make(tiny_mtp_model_dir, k=3)
    prompts = ["ROMEO:", "JULIET: O", "x"]
    for p, w in zip(prompts, want):
        by_prompt[tuple(llm.engine.tokenizer.encode(p, add_special_tokens=False))] = w
    outs = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in outs] == want
    st = llm.engine.spec.stats
    if wrong_at is None:
        assert st.accepted == st.drafted > 0
    else:
        assert (st.accepted > 0) == (wrong_at > 0) and st.accepted < st.drafted


def test_nextn_sampled_outputs_validate(tiny_mtp_model_dir):
    llm = make(tiny_mtp_model_dir, k=2)
    spec = StructuredOutput(json=SCHEMAS[2])
    outs = llm.generate(["ROMEO:"] * 6, [sampled(spec, s) for s in range(6)])
    for o in outs:
        assert o.outputs[0].finish_reason == "stop"
        validate(json.loads(o.outputs[0].text), SCHEMAS[2])
    llm.engine.check_integrity()


def test_an_evicted_grammar_passed_compiled_is_not_compiled_again(llm, monkeypatch):
    """AsyncEngine hands the engine the grammar it awaited: with more distinct grammars in flight than the cache
    holds, the engine loop must not compile an evicted one again."""
    from nextserve.engine import structured

    monkeypatch.setattr(structured, "MAX_CACHED_GRAMMARS", 1)
    grammars, compiled = llm.engine.grammars, []
    real = grammars._compile
    monkeypatch.setattr(grammars, "_compile", lambda spec: compiled.append(spec) or real(spec))
    first, second = StructuredOutput(choice=["alpha", "beta"]), StructuredOutput(choice=["gamma", "delta"])
    grammar = grammars.get(first)
    grammars.get(second)  # evicts the first
    params = SamplingParams(temperature=0, max_tokens=8, structured=first)
    llm.engine.add_request("evicted", [1, 2, 3], params, stream=False, grammar=grammar)
    outs = []
    while llm.engine.has_unfinished():
        outs += llm.engine.step()
    assert outs[-1].outputs[0].text in ("alpha", "beta")
    assert compiled == [first, second]
