"""A stand-in OpenAI completions server with a prefix cache, for unit tests of ``kvstore proxy``.

It answers ``/v1/completions`` for token-id prompts with one token, and reports in
``usage.prompt_tokens_details.cached_tokens`` how many leading tokens it had seen
before, in whole blocks, as an engine with prefix caching would. Only for unit
tests of routing: the real-engine tests run vLLM.
"""

from __future__ import annotations

from typing import Any


class EngineStub:
    """``app()`` is the aiohttp application; ``requests`` lists the bodies it was sent."""

    def __init__(self, name: str, block: int = 16) -> None:
        self.name = name
        self.block = block
        self.requests: list[dict[str, Any]] = []
        self._cached: set[tuple[int, ...]] = set()

    def _serve(self, prompt: list[int]) -> int:
        cached = 0
        for end in range(self.block, len(prompt) + 1, self.block):
            if tuple(prompt[:end]) not in self._cached:
                break
            cached = end
        for end in range(self.block, len(prompt) + 1, self.block):
            self._cached.add(tuple(prompt[:end]))
        return cached

    def app(self) -> Any:
        from aiohttp import web

        async def completions(request: web.Request) -> web.Response:
            body = await request.json()
            self.requests.append(body)
            prompt = body.get("prompt")
            if not isinstance(prompt, list):
                return web.json_response({"error": {"message": "token-id prompts only"}}, status=400)
            cached = self._serve(prompt)
            return web.json_response({
                "choices": [{"index": 0, "text": self.name, "token_ids": [len(prompt) % 500]}],
                "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1,
                          "prompt_tokens_details": {"cached_tokens": cached}},
                "kv_transfer_params": {"from": self.name}})

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        return app
