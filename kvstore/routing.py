"""Cache-aware choice of an engine instance for a request (``kvstore proxy --policy``).

An engine answers a prompt fastest when the prompt's prefix is already in its own
prefix cache. The router keeps, per instance, an index of the prompt prefixes it
has sent there (an approximate picture of that instance's cache, as SGLang's
cache-aware router keeps one): the prompt is cut into blocks (``block_tokens`` token
ids, or ``block_chars`` characters of text for string prompts and chat messages),
each block's key is the XXH3 of the previous key and the block (so a key names the
whole prefix up to it), and an instance's index holds the keys of the prompts it
was given, least recently used dropped beyond ``capacity`` keys.

Policies:

* ``round_robin``: in turn, whatever the prompt;
* ``prefix``: the instance whose index holds the longest prefix of the prompt; ties
  go to the instance with fewer requests in flight, then in turn;
* ``prefix_load`` (the default): ``prefix`` among the instances whose requests in
  flight are within ``max_imbalance`` of the least loaded one, so a popular prefix
  does not pile every request onto one instance.
"""

from __future__ import annotations

import itertools
import struct
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from kvstore.errors import InvalidArgument

POLICIES = ("round_robin", "prefix", "prefix_load")


def prompt_blocks(body: dict[str, Any], block_tokens: int = 16, block_chars: int = 64) -> list[bytes]:
    """The blocks of a completions or chat request's prompt (the first prompt of a batch);
    an empty list when there is no prompt to route by."""
    prompt = _first_prompt(body)
    if prompt is None and isinstance(body.get("messages"), list):
        prompt = "".join(f"{m.get('role', '')}\x00{_text(m.get('content'))}\x00"
                         for m in body["messages"] if isinstance(m, dict))
    if isinstance(prompt, str):
        data = prompt.encode()
        step = block_chars
        return [data[i:i + step] for i in range(0, len(data) - len(data) % step, step)]
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        whole = len(prompt) - len(prompt) % block_tokens
        return [struct.pack(f"<{block_tokens}q", *prompt[i:i + block_tokens]) for i in range(0, whole, block_tokens)]
    return []


def prompt_token_ids(body: dict[str, Any], tokenizer: Any = None) -> list[int] | None:
    """The token ids an engine will see for a completions or chat request (the first prompt
    of a batch): a token-id prompt as given; a text prompt or chat messages through
    ``tokenizer`` (a transformers tokenizer: ``encode`` with special tokens, as vLLM's
    completions endpoint does; the chat template with the generation prompt). ``None``
    when that cannot be known (no tokenizer, or nothing to route by)."""
    prompt = _first_prompt(body)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    if tokenizer is None:
        return None
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids.get("input_ids", ids) if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(t) for t in ids]
    return None


def _first_prompt(body: dict[str, Any]) -> Any:
    """A completions request's ``prompt``; of a batch (a list of prompts), the first."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return prompt[0]
    return prompt


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def prefix_keys(blocks: Sequence[bytes], salt: bytes = b"") -> list[int]:
    """Key ``i`` names blocks ``0..i``: the XXH3-64 of key ``i - 1`` and block ``i``."""
    keys, prev = [], xxhash.xxh3_64_intdigest(salt)
    for b in blocks:
        prev = xxhash.xxh3_64_intdigest(prev.to_bytes(8, "little") + b)
        keys.append(prev)
    return keys


@dataclass
class Choice:
    """Where a request goes, and why."""

    instance: str
    matched: int
    """Blocks of the prompt the chosen instance's index held (the predicted hit)."""
    blocks: int
    reason: str
    """``round_robin``, ``prefix`` (longest prefix), ``load`` (no instance held any of it,
    or the longest prefix was on an overloaded one: fewest in flight)."""


class PrefixRouter:
    """Chooses among ``instances`` by ``policy``; tracks requests in flight per instance.

    Not thread-safe: the proxy calls it from its one event loop.
    """

    def __init__(self, instances: Sequence[str], policy: str = "prefix_load", *, capacity: int = 1 << 18,
                 max_imbalance: int = 4) -> None:
        if not instances:
            raise InvalidArgument("a router needs at least one instance")
        if policy not in POLICIES:
            raise InvalidArgument(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if capacity < 1 or max_imbalance < 0:
            raise InvalidArgument("capacity must be >= 1 and max_imbalance >= 0")
        self.instances = list(instances)
        self.policy = policy
        self.capacity = capacity
        self.max_imbalance = max_imbalance
        self.in_flight = {i: 0 for i in self.instances}
        self._index: dict[str, OrderedDict[int, None]] = {i: OrderedDict() for i in self.instances}
        self._turn = itertools.count()

    def matched(self, instance: str, keys: Sequence[int]) -> int:
        """How many leading ``keys`` the instance's index holds."""
        index, n = self._index[instance], 0
        for k in keys:
            if k not in index:
                break
            n += 1
        return n

    def choose(self, keys: Sequence[int], known: Mapping[str, int] | None = None,
               blocks: int | None = None) -> Choice:
        """Pick an instance for a prompt with prefix ``keys`` and remember that it went there
        (the caller pairs it with :meth:`done`). ``known``: per instance, the prompt's
        leading blocks its cache is known to hold (from its KV events,
        :class:`~kvstore.engine_events.EngineIndex`), out of ``blocks``; it replaces the
        router's own history for the instances it names."""
        turn = next(self._turn)
        order = self.instances[turn % len(self.instances):] + self.instances[:turn % len(self.instances)]
        known = known or {}

        def held_by(i: str) -> int:
            return known[i] if i in known else self.matched(i, keys)

        if self.policy == "round_robin":
            pick, matched, reason = order[0], held_by(order[0]), "round_robin"
        else:
            held = {i: held_by(i) for i in order}
            pool = order
            if self.policy == "prefix_load":
                least = min(self.in_flight.values())
                pool = [i for i in order if self.in_flight[i] <= least + self.max_imbalance]
            pick = max(enumerate(pool), key=lambda t: (held[t[1]], -self.in_flight[t[1]], -t[0]))[1]
            matched = held[pick]
            reason = "prefix" if matched and matched == max(held.values()) else "load"
        self._remember(pick, keys)
        self.in_flight[pick] += 1
        return Choice(pick, matched, len(keys) if blocks is None else blocks, reason)

    def done(self, instance: str) -> None:
        """A request sent to ``instance`` finished (answered or failed)."""
        self.in_flight[instance] = max(0, self.in_flight[instance] - 1)

    def _remember(self, instance: str, keys: Sequence[int]) -> None:
        index = self._index[instance]
        for k in keys:
            if k in index:
                index.move_to_end(k)
            else:
                index[k] = None
        while len(index) > self.capacity:
            index.popitem(last=False)
