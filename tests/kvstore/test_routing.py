"""kvstore.routing: prompt blocks, prefix keys and the policies of ``kvstore proxy``."""

from __future__ import annotations

import pytest

from kvstore.errors import InvalidArgument
from kvstore.routing import PrefixRouter, prefix_keys, prompt_blocks, prompt_token_ids
from kvstore.testing.prometheus import sample_sum

A, B, C = "http://a", "http://b", "http://c"


def keys_of(body: dict[str, object]) -> list[int]:
    return prefix_keys(prompt_blocks(body, block_tokens=4, block_chars=8))


def test_prompt_blocks_of_every_request_shape() -> None:
    assert len(prompt_blocks({"prompt": list(range(10))}, block_tokens=4)) == 2  # the partial block is left out
    assert len(prompt_blocks({"prompt": "x" * 20}, block_chars=8)) == 2
    assert prompt_blocks({"prompt": [list(range(8)), [1]]}, block_tokens=4) == \
        prompt_blocks({"prompt": list(range(8))}, block_tokens=4)  # a batch routes by its first prompt
    chat = {"messages": [{"role": "system", "content": "be brief" * 4},
                         {"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}
    assert len(prompt_blocks(chat, block_chars=8)) > 2
    assert prompt_blocks({"prompt": None}) == [] and prompt_blocks({"messages": "nope"}) == []
    assert prompt_blocks({"prompt": [True, False, 1, 2]}, block_tokens=2) == []  # not token ids


def test_prefix_keys_name_the_whole_prefix() -> None:
    one = keys_of({"prompt": list(range(12))})
    two = keys_of({"prompt": list(range(12)) + [99] * 8})
    assert two[:3] == one and len(two) == 5
    other = keys_of({"prompt": [7] + list(range(1, 12))})  # one token differs in the first block
    assert not set(other) & set(one)
    assert prefix_keys(prompt_blocks({"prompt": "abcdefgh"}, block_chars=8), b"model-a") != \
        prefix_keys(prompt_blocks({"prompt": "abcdefgh"}, block_chars=8), b"model-b")


@pytest.mark.parametrize("policy", ["prefix", "prefix_load"])
def test_every_turn_of_a_conversation_goes_where_its_prefix_is(policy: str) -> None:
    r = PrefixRouter([A, B], policy)
    convs = {c: [1000 * c + t for t in range(8)] for c in range(6)}
    first: dict[int, str] = {}
    for turn in range(4):
        for c, prompt in convs.items():
            prompt += [1000 * c + 100 + 10 * turn + t for t in range(8)]  # each turn extends the last
            choice = r.choose(keys_of({"prompt": prompt}))
            r.done(choice.instance)
            if turn == 0:
                first[c] = choice.instance
                assert choice.matched == 0 and choice.reason == "load"
            else:
                assert choice.instance == first[c] and choice.reason == "prefix"
                assert choice.matched == choice.blocks - 2  # all but the two new blocks
    assert sorted(first.values()).count(A) == 3  # new conversations spread over both


def test_round_robin_ignores_the_prompt() -> None:
    r = PrefixRouter([A, B, C], "round_robin")
    keys = keys_of({"prompt": list(range(16))})
    assert [r.choose(keys).instance for _ in range(4)] == [A, B, C, A]


def test_prefix_load_passes_over_an_overloaded_holder() -> None:
    keys = keys_of({"prompt": list(range(16))})
    for policy, expect in (("prefix", A), ("prefix_load", B)):
        r = PrefixRouter([A, B], policy, max_imbalance=2)
        assert r.choose(keys).instance == A  # A now holds the prefix, with one request in flight
        for _ in range(2):
            r.in_flight[A] += 1  # three in flight on A, none on B
        c = r.choose(keys)
        assert c.instance == expect
        assert c.reason == ("prefix" if expect == A else "load")


def test_ties_go_to_the_least_loaded_then_in_turn() -> None:
    r = PrefixRouter([A, B, C], "prefix")
    r.in_flight[A] = 2
    assert r.choose([]).instance in (B, C)
    r.in_flight = {A: 0, B: 0, C: 0}
    got = {r.choose([]).instance for _ in range(3)}
    assert got == {A, B, C}


def test_index_forgets_least_recently_used_beyond_capacity() -> None:
    r = PrefixRouter([A], "prefix", capacity=4)
    old = keys_of({"prompt": list(range(16))})  # 4 blocks
    r.choose(old)
    assert r.matched(A, old) == 4
    r.choose(keys_of({"prompt": list(range(100, 108))}))  # 2 more: the 2 oldest go
    assert r.matched(A, old) == 0  # its first block was dropped, so no prefix of it remains


def test_known_holdings_replace_the_history() -> None:
    """What the servers' events say they hold beats what the router sent where."""
    r = PrefixRouter(["a", "b"], "prefix")
    keys = prefix_keys([b"x" * 16, b"y" * 16])
    r.done(r.choose(keys).instance)  # history: "a" got this prompt
    c = r.choose(keys, known={"a": 0, "b": 5}, blocks=6)  # but only "b"'s cache holds it (a evicted it)
    assert (c.instance, c.matched, c.blocks, c.reason) == ("b", 5, 6, "prefix")
    r.done("b")
    c = r.choose(keys, known={"b": 0})  # "a" not named: its history still counts
    assert (c.instance, c.matched, c.reason) == ("a", 2, "prefix")


class _Tok:
    def encode(self, text: str) -> list[int]:
        return [1] + [ord(ch) for ch in text]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                            tokenize: bool) -> list[int]:
        assert add_generation_prompt and tokenize
        return [2] + [ord(m["content"][0]) for m in messages]


def test_prompt_token_ids_as_the_engine_sees_them() -> None:
    assert prompt_token_ids({"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert prompt_token_ids({"prompt": [[5, 6], [7]]}) == [5, 6]
    assert prompt_token_ids({"prompt": "ab"}) is None  # text needs a tokenizer
    assert prompt_token_ids({"prompt": "ab"}, _Tok()) == [1, 97, 98]
    assert prompt_token_ids({"messages": [{"role": "user", "content": "hi"}]}, _Tok()) == [2, 104]
    assert prompt_token_ids({}, _Tok()) is None


def test_bad_router_arguments() -> None:
    with pytest.raises(InvalidArgument, match="policy"):
        PrefixRouter([A], "random")
    with pytest.raises(InvalidArgument, match="at least one"):
        PrefixRouter([], "prefix")


def _multi_turn(policy: str, conversations: int = 5, turns: int = 4) -> dict[str, object]:
    """Conversations that extend their prompt each turn (after a shared system prompt),
    through ``kvstore proxy`` in front of three prefill stubs and one decode stub (each
    with a prefix cache); what the prefill stubs were sent and the proxy's /metrics.
    Five conversations over three servers: round robin moves each from server to server."""
    import asyncio

    aiohttp = pytest.importorskip("aiohttp", reason="kvstore proxy needs aiohttp (kvstore[vllm])")
    from aiohttp.test_utils import TestServer

    from kvstore.cli.proxy import make_app
    from kvstore.testing.engine_stub import EngineStub

    async def run() -> dict[str, object]:
        stubs = [EngineStub("p0"), EngineStub("p1"), EngineStub("p2"), EngineStub("d0")]
        servers = [TestServer(s.app()) for s in stubs]
        for s in servers:
            await s.start_server()
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        proxy = TestServer(make_app(urls[:3], urls[3:], 30, policy=policy))
        await proxy.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                system = list(range(1, 33))  # a shared system prompt: two blocks
                convs = {c: system + [100 * c + t for t in range(16)] for c in range(conversations)}
                for turn in range(turns):
                    for c, prompt in convs.items():
                        async with http.post(proxy.make_url("/v1/completions"),
                                             json={"model": "m", "prompt": prompt, "max_tokens": 4}) as r:
                            assert r.status == 200
                            got = await r.json()
                            assert got["choices"][0]["text"] == "d0"
                        prompt += [100 * c + 50 + turn] * 16  # the answer and the next question
                async with http.get(proxy.make_url("/metrics")) as r:
                    text = await r.text()
            sent = {s.name: [len(b["prompt"]) for b in s.requests] for s in stubs[:3]}
            for s in stubs[:3]:
                assert all(b["max_tokens"] == 1 for b in s.requests)  # the prefill leg
            assert all(b["kv_transfer_params"]["from"] in ("p0", "p1", "p2") for b in stubs[3].requests)
            return {"metrics": text, "sent": sent}
        finally:
            await proxy.close()
            for s in servers:
                await s.close()

    return asyncio.run(run())


def test_proxy_prefix_policy_raises_the_prefill_hit_rate() -> None:
    """Same multi-turn workload, round robin vs prefix: with prefix every later turn of a
    conversation lands on the prefill server that has its prefix, so the servers report
    far more cached prompt tokens; /metrics shows the decisions and predicted hits."""
    rates = {}
    for policy in ("round_robin", "prefix", "prefix_load"):
        out = _multi_turn(policy)
        text = str(out["metrics"])
        cached = sample_sum(text, "kvstore_proxy_prefill_cached_tokens_total")
        prompt = sample_sum(text, "kvstore_proxy_prefill_prompt_tokens_total")
        rates[policy] = cached / prompt
        assert sample_sum(text, "kvstore_proxy_requests_total", leg="prefill") == 20
        if policy != "round_robin":
            predicted = sample_sum(text, "kvstore_proxy_predicted_hit_blocks_total", leg="prefill")
            assert predicted * 16 >= cached  # the proxy predicted at least what the servers hit
            assert sample_sum(text, "kvstore_proxy_requests_total", leg="prefill", reason="prefix") >= 15
    assert rates["prefix"] >= 1.5 * rates["round_robin"]
    assert rates["prefix_load"] >= 1.5 * rates["round_robin"]
