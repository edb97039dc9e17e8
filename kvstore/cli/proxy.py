"""``kvstore proxy``: one OpenAI-compatible endpoint in front of a prefill and a decode vLLM.

Each completion request goes to a prefill server with ``max_tokens=1`` (its
connector stores the prompt's KV in kvstore and answers with
``kv_transfer_params`` naming what it stored), then to a decode server with
those params (its connector loads the KV instead of recomputing it); the
decode server's answer, streamed or not, is relayed to the client as it comes.

If the prefill server fails, the request still goes to decode, which then
recomputes the prompt (logged; the answer is the same, only slower).

With several prefill or decode servers, ``--policy`` picks one per request
(:mod:`kvstore.routing`): ``round_robin``, ``prefix`` (the server that was sent the
longest prefix of this prompt before, so its own prefix cache holds it) or
``prefix_load`` (``prefix`` among the servers not overloaded; the default). Its
decisions, predicted hits and the prefill servers' reported cached tokens are on
``/metrics``. Needs ``aiohttp`` (``pip install 'kvstore[vllm]'``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
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


class ProxyMetrics:
    """The proxy's own Prometheus metrics (one registry per app)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.routed = Counter("kvstore_proxy_requests", "Requests routed, per leg, server and reason",
                              ["leg", "server", "reason"], registry=self.registry)
        self.blocks = Counter("kvstore_proxy_prompt_blocks", "Prompt blocks routed, per leg",
                              ["leg"], registry=self.registry)
        self.predicted = Counter("kvstore_proxy_predicted_hit_blocks",
                                 "Prompt blocks the chosen server was predicted to hold, per leg",
                                 ["leg"], registry=self.registry)
        self.cached = Counter("kvstore_proxy_prefill_cached_tokens",
                              "Prompt tokens prefill servers reported as cached "
                              "(usage.prompt_tokens_details.cached_tokens, where they report it)",
                              registry=self.registry)
        self.prompt_tokens = Counter("kvstore_proxy_prefill_prompt_tokens",
                                     "Prompt tokens prefill servers reported (usage.prompt_tokens)",
                                     registry=self.registry)
        self.in_flight = Gauge("kvstore_proxy_in_flight", "Requests in flight, per leg and server",
                               ["leg", "server"], registry=self.registry)
        self.failed = Counter("kvstore_proxy_upstream_failures", "Upstream requests that failed, per leg",
                              ["leg"], registry=self.registry)
        self.sources = Counter("kvstore_proxy_routing_source",
                               "Where routing decisions learned what the servers hold, per leg: the servers' "
                               "own KV events (--engine-events), or the proxy's history of what it sent",
                               ["leg", "source"], registry=self.registry)

    def usage(self, answer: dict[str, Any] | None) -> None:
        usage = (answer or {}).get("usage")
        if not isinstance(usage, dict):
            return
        if isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens.inc(usage["prompt_tokens"])
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached.inc(details["cached_tokens"])


@dataclass
class EngineEventsConfig:
    """Route by the servers' own KV events (``--engine-events``) instead of the proxy's history."""

    endpoints: dict[str, str]
    """Server URL -> the ZMQ endpoint its ``--kv-events-config`` publishes on."""
    topic: str = ""
    block_size: int = 16
    """The engines' ``--block-size``."""
    hash_algo: str = "sha256"
    """The engines' ``--prefix-caching-hash-algo``."""
    tokenizer: str | None = None
    """Tokenizer (path or name) for text prompts and chat messages; token-id prompts need none."""


def make_app(prefill: list[str], decode: list[str], timeout: float, trust_client_params: bool = False, *,
             policy: str = "prefix_load", block_tokens: int = 16, block_chars: int = 64,
             max_imbalance: int = 4, index_capacity: int = 1 << 18,
             engine_events: EngineEventsConfig | None = None) -> Any:
    """The aiohttp application (built lazily so the CLI loads without aiohttp)."""
    import aiohttp
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from kvstore.engine_events import EngineIndex, EventSubscriber
    from kvstore.routing import PrefixRouter, prefix_keys, prompt_blocks, prompt_token_ids

    routers = {leg: PrefixRouter(servers, policy, capacity=index_capacity, max_imbalance=max_imbalance)
               for leg, servers in (("prefill", prefill), ("decode", decode))}
    metrics = ProxyMetrics()
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    ee = engine_events
    index = EngineIndex(ee.endpoints) if ee is not None else None
    tokenizer = None
    if ee is not None:
        from connectors.vllm.events import block_hashes

        if ee.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ee.tokenizer)

    def engine_view(body: dict[str, Any]) -> tuple[dict[str, int], int] | None:
        """Per server with events: the prompt's leading blocks its cache holds, and the
        prompt's block count; None when the prompt's token ids cannot be known."""
        if ee is None or index is None or policy == "round_robin":
            return None
        tokens = prompt_token_ids(body, tokenizer)
        if tokens is None:
            return None
        hashes = block_hashes(tokens, ee.block_size, hash_algo=ee.hash_algo, cache_salt=body.get("cache_salt"))
        return index.match(hashes).instances, len(hashes)

    def route(leg: str, keys: list[int], view: tuple[dict[str, int], int] | None) -> str:
        known = {s: n for s, n in (view[0] if view else {}).items() if s in routers[leg].in_flight}
        c = routers[leg].choose(keys, known, view[1] if known and view else None)
        metrics.sources.labels(leg, "events" if known else "history").inc()
        metrics.routed.labels(leg, c.instance, c.reason).inc()
        metrics.blocks.labels(leg).inc(c.blocks)
        metrics.predicted.labels(leg).inc(c.matched)
        metrics.in_flight.labels(leg, c.instance).set(routers[leg].in_flight[c.instance])
        return c.instance

    def finished(leg: str, server: str) -> None:
        routers[leg].done(server)
        metrics.in_flight.labels(leg, server).set(routers[leg].in_flight[server])

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(timeout=client_timeout)
        if ee is not None and index is not None:
            app["events"] = EventSubscriber(index, ee.endpoints, ee.topic)

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()
        if "events" in app:
            app["events"].close()

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
        # the same prompt under another model or cache salt shares no cache
        salt = f"{body.get('model', '')}\x00{body.get('cache_salt', '')}".encode()
        keys = prefix_keys(prompt_blocks(body, block_tokens, block_chars), salt)
        view = engine_view(body)
        answer: dict[str, Any] | None = None
        p_server = route("prefill", keys, view)
        p_url = p_server.rstrip("/") + path
        try:
            async with session.post(p_url, json=prefill_body(body)) as r:
                if r.status == 200:
                    answer = await r.json()
                    metrics.usage(answer)
                else:
                    metrics.failed.labels("prefill").inc()
                    log.warning("prefill %s answered %d: %s; decode recomputes", p_url, r.status,
                                (await r.text())[:300])
        except (aiohttp.ClientError, TimeoutError) as e:
            metrics.failed.labels("prefill").inc()
            log.warning("prefill %s failed (%s); decode recomputes", p_url, e)
        finally:
            finished("prefill", p_server)
        d_server = route("decode", keys, view)
        d_url = d_server.rstrip("/") + path
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
            metrics.failed.labels("decode").inc()
            log.error("decode %s failed: %s", d_url, e)
            return web.json_response({"error": {"message": f"decode server failed: {e}"}}, status=502)
        finally:
            finished("decode", d_server)

    async def models(request: web.Request) -> web.Response:
        session: aiohttp.ClientSession = request.app["session"]
        async with session.get(decode[0].rstrip("/") + "/v1/models") as r:
            return web.Response(body=await r.read(), status=r.status, content_type=r.content_type)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "prefill": prefill, "decode": decode, "policy": policy})

    async def prometheus(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    for path in _FORWARDED:
        app.router.add_post(path, forward)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
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
@click.option("--policy", type=click.Choice(["round_robin", "prefix", "prefix_load"]), default="prefix_load",
              show_default=True,
              help="How to pick among several prefill (and decode) servers: in turn; the one sent the longest "
                   "prefix of this prompt before (its own prefix cache holds it); or that, among the servers "
                   "within --max-imbalance requests in flight of the least loaded.")
@click.option("--block-tokens", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompt block the prefix index keys on, for token-id prompts.")
@click.option("--block-chars", type=click.IntRange(min=1), default=64, show_default=True,
              help="Prompt block the prefix index keys on, for text prompts and chat messages.")
@click.option("--max-imbalance", type=click.IntRange(min=0), default=4, show_default=True,
              help="prefix_load: servers with more than this many requests in flight above the least "
                   "loaded one are passed over.")
@click.option("--index-capacity", type=click.IntRange(min=1), default=1 << 18, show_default=True,
              help="Prompt blocks remembered per server (least recently used dropped beyond).")
@click.option("--engine-events", "engine_events", multiple=True, metavar="URL=ENDPOINT",
              help="Route by what a server's cache really holds: its vLLM KV-event stream "
                   "(--kv-events-config endpoint, e.g. http://127.0.0.1:8100=ipc:///tmp/p0.sock or "
                   "=tcp://127.0.0.1:5557 for an engine bound to tcp://*:5557); repeat per server. "
                   "Needs pyzmq and vLLM (for its block hashes).")
@click.option("--events-topic", default="", show_default=True, help="--engine-events: the engines' topic.")
@click.option("--kv-block-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="--engine-events: the engines' --block-size.")
@click.option("--hash-algo", default="sha256", show_default=True,
              help="--engine-events: the engines' --prefix-caching-hash-algo.")
@click.option("--tokenizer", default=None,
              help="--engine-events: tokenizer (local path) to turn text prompts and chat messages into the "
                   "engines' token ids [default: only token-id prompts use the events].")
def proxy(prefill: tuple[str, ...], decode: tuple[str, ...], host: str, port: int, timeout: float,
          trust_client_params: bool, policy: str, block_tokens: int, block_chars: int, max_imbalance: int,
          index_capacity: int, engine_events: tuple[str, ...], events_topic: str, kv_block_size: int,
          hash_algo: str, tokenizer: str | None) -> None:
    """OpenAI-compatible P/D proxy: prefill (max_tokens=1) then decode, streaming the answer.

    With several servers per role, --policy routes each request to the one most likely
    to hold its prompt's prefix in its own cache (GET /metrics: decisions and hits).
    """
    try:
        from aiohttp import web
    except ImportError as e:
        raise ConfigError("kvstore proxy needs aiohttp: pip install 'kvstore[vllm]'") from e
    for url in (*prefill, *decode):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--prefill/--decode must be http(s) URLs, got {url!r}")
    events = None
    if engine_events:
        endpoints: dict[str, str] = {}
        for spec in engine_events:
            url, sep, endpoint = spec.partition("=")
            if not sep or not endpoint:
                raise ConfigError(f"--engine-events takes URL=ENDPOINT, got {spec!r}")
            if url not in (*prefill, *decode):
                raise ConfigError(f"--engine-events: {url!r} is not one of the --prefill/--decode servers")
            if not endpoint.startswith(("tcp://", "ipc://")):
                raise ConfigError(f"--engine-events: endpoint must be tcp:// or ipc://, got {endpoint!r}")
            endpoints[url] = endpoint
        events = EngineEventsConfig(endpoints, events_topic, kv_block_size, hash_algo, tokenizer)
    logging.getLogger("kvstore.proxy").setLevel(logging.INFO)
    click.echo(f"kvstore proxy on http://{host}:{port}: prefill {list(prefill)} -> decode {list(decode)} "
               f"(policy {policy})")
    web.run_app(make_app(list(prefill), list(decode), timeout, trust_client_params, policy=policy,
                         block_tokens=block_tokens, block_chars=block_chars, max_imbalance=max_imbalance,
                         index_capacity=index_capacity, engine_events=events), host=host, port=port, print=None)
