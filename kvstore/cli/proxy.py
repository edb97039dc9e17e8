"""``kvstore proxy``: one OpenAI-compatible endpoint in front of a prefill and a decode vLLM.

Each completion request goes to a prefill server with ``max_tokens=1`` (its
connector stores the prompt's KV in kvstore and answers with
``kv_transfer_params`` naming what it stored), then to a decode server with
those params (its connector loads the KV instead of recomputing it); the
decode server's answer, streamed or not, is relayed to the client as it comes.

If the prefill server fails, the request still goes to decode, which then
recomputes the prompt (logged; the answer is the same, only slower).
Needs ``aiohttp`` (``pip install 'kvstore[vllm]'``).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import click

from kvstore.errors import ConfigError

log = logging.getLogger("kvstore.proxy")

_FORWARDED = ("/v1/completions", "/v1/chat/completions")


UNTRUSTED = ("kv_transfer_params", "cache_salt")
"""Request fields a client could abuse (point the decode at another request's chunks,
probe whether a guessed prompt is cached under someone else's salt): dropped from the
client's request unless the proxy is told to trust its clients."""


def client_body(body: dict[str, Any], trust: bool) -> dict[str, Any]:
    """The client's request as the proxy forwards it (without :data:`UNTRUSTED` fields
    unless ``trust``)."""
    return dict(body) if trust else {k: v for k, v in body.items() if k not in UNTRUSTED}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg of a request: one token, no streaming, ask the producer to hand off."""
    out = dict(body)
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    params = dict(out.get("kv_transfer_params") or {})
    params.setdefault("do_remote_decode", True)
    out["kv_transfer_params"] = params
    return out


def decode_body(body: dict[str, Any], prefill_answer: dict[str, Any] | None) -> dict[str, Any]:
    """The decode leg: the client's request plus the producer's ``kv_transfer_params``."""
    out = dict(body)
    params = (prefill_answer or {}).get("kv_transfer_params")
    if isinstance(params, dict):
        out["kv_transfer_params"] = params
    return out


def make_app(prefill: list[str], decode: list[str], timeout: float, trust_client_params: bool = False) -> Any:
    """The aiohttp application (built lazily so the CLI loads without aiohttp)."""
    import aiohttp
    from aiohttp import web

    rr_prefill, rr_decode = itertools.cycle(prefill), itertools.cycle(decode)
    client_timeout = aiohttp.ClientTimeout(total=timeout)

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(timeout=client_timeout)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "request body is not JSON"}}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": {"message": "request body must be a JSON object"}}, status=400)
        body = client_body(body, trust_client_params)
        path = request.path
        answer: dict[str, Any] | None = None
        p_url = next(rr_prefill).rstrip("/") + path
        try:
            async with session.post(p_url, json=prefill_body(body)) as r:
                if r.status == 200:
                    answer = await r.json()
                else:
                    log.warning("prefill %s answered %d: %s; decode recomputes", p_url, r.status,
                                (await r.text())[:300])
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("prefill %s failed (%s); decode recomputes", p_url, e)
        d_url = next(rr_decode).rstrip("/") + path
        try:
            async with session.post(d_url, json=decode_body(body, answer)) as r:
                resp = web.StreamResponse(status=r.status)
                resp.content_type = r.content_type
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError) as e:
            log.error("decode %s failed: %s", d_url, e)
            return web.json_response({"error": {"message": f"decode server failed: {e}"}}, status=502)

    async def models(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        async with session.get(decode[0].rstrip("/") + "/v1/models") as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "prefill": prefill, "decode": decode})

    app = web.Application()
    for path in _FORWARDED:
        app.router.add_post(path, forward)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


@click.command("proxy")
@click.option("--prefill", "prefill", multiple=True, required=True,
              help="Prefill (kv_producer) server URL, e.g. http://127.0.0.1:8100; repeat for round robin.")
@click.option("--decode", "decode", multiple=True, required=True,
              help="Decode (kv_consumer) server URL; repeat for round robin.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port to listen on.")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds one upstream request may take.")
@click.option("--trust-client-params", is_flag=True,
              help="Forward the clients' own kv_transfer_params and cache_salt (dropped by default: a client "
                   "could point the decode at another request's KV or probe others' prompts).")
def proxy(prefill: tuple[str, ...], decode: tuple[str, ...], host: str, port: int, timeout: float,
          trust_client_params: bool) -> None:
    """OpenAI-compatible P/D proxy: prefill (max_tokens=1) then decode, streaming the answer."""
    try:
        from aiohttp import web
    except ImportError as e:
        raise ConfigError("kvstore proxy needs aiohttp: pip install 'kvstore[vllm]'") from e
    for url in (*prefill, *decode):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--prefill/--decode must be http(s) URLs, got {url!r}")
    logging.getLogger("kvstore.proxy").setLevel(logging.INFO)
    click.echo(f"kvstore proxy on http://{host}:{port}: prefill {list(prefill)} -> decode {list(decode)}")
    web.run_app(make_app(list(prefill), list(decode), timeout, trust_client_params), host=host, port=port, print=None)
