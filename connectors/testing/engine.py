"""Run a real vLLM engine in a child process and drive it with JSON lines over pipes.

``EngineProcess(model_dir, kv=...)`` starts ``python -m connectors.testing.engine``,
which builds an in-process ``vllm.LLM`` (CPU, fp32, eager, block size 32) and
then answers one JSON command per stdin line with one JSON line on stdout:

* ``{"op": "generate", "prompts": [[ids...]], "max_tokens": N, "params": [...]}``
  -> ``{"tokens": [[ids...]], "params": [...], "seconds": s, "ttft": [...]}``
* ``{"op": "stats"}`` -> the connector's scheduler and worker counters
* ``{"op": "wait_idle"}`` -> after queued saves/loads have run
* ``{"op": "reset_prefix_cache"}`` -> vLLM's own prefix cache emptied
* ``{"op": "exit"}``

One engine per process keeps vLLM's process-global state apart and frees its
memory on exit. Pipes carry JSON only (no pickle). vLLM's own log goes to a file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvstore.errors import KVStoreError, Timeout

log = logging.getLogger(__name__)

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "INFO",
}
"""Environment of every engine the tests and benchmarks start (CPU, offline, loopback)."""

ROOT = Path(__file__).resolve().parents[2]


def kv_transfer_config(master: str, role: str, **extra: Any) -> dict[str, Any]:
    """The ``kv_transfer_config`` dict that loads this repository's connector."""
    return {
        "kv_connector": "KVStoreConnector",
        "kv_connector_module_path": "connectors.vllm",
        "kv_role": role,
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"master": master, **extra},
    }


class EngineProcess:
    """A child process holding one vLLM engine. Use as a context manager."""

    def __init__(self, model_dir: Path | str, *, kv: dict[str, Any] | None = None,
                 log: Path | str | None = None, max_model_len: int = 4096,
                 max_num_batched_tokens: int | None = None,
                 connector: str | None = None, start_timeout: float = 240.0,
                 extra_env: dict[str, str] | None = None, max_lora_rank: int = 0, block_size: int = 32,
                 tensor_parallel_size: int = 1, dtype: str = "float32",
                 attention_backend: str | None = None, prefix_caching: bool | None = None,
                 kv_events: dict[str, Any] | None = None) -> None:
        cfg = {"model": str(model_dir), "kv": kv, "kv_events": kv_events, "max_model_len": max_model_len,
               "max_num_batched_tokens": max_num_batched_tokens, "max_lora_rank": max_lora_rank,
               "block_size": block_size, "tensor_parallel_size": tensor_parallel_size, "dtype": dtype,
               "attention_backend": attention_backend, "prefix_caching": prefix_caching}
        if tensor_parallel_size > 1:  # vllm-cpu binds each worker to its own cores; one NUMA node here
            cpus = sorted(os.sched_getaffinity(0))
            per = max(1, len(cpus) // tensor_parallel_size)
            binds = ["-".join(str(c) for c in (cpus[i * per], cpus[min((i + 1) * per, len(cpus)) - 1]))
                     for i in range(tensor_parallel_size)]
            extra_env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(binds), **(extra_env or {})}
        if connector == "example" and kv is None:
            raise KVStoreError("connector='example' needs a kv config")
        env = {**os.environ, **ENGINE_ENV, **(extra_env or {}),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.log_path = Path(log) if log else None
        err = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connectors.testing.engine", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=str(ROOT),
            start_new_session=True)
        ready = self._read(start_timeout)
        if ready.get("ready") is not True:
            self.close()
            raise KVStoreError(f"engine did not start: {ready}")

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise Timeout(f"engine answered nothing in {timeout:.0f}s (log: {self.log_path})")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if r:
                line = self.proc.stdout.readline()
                if not line:
                    raise KVStoreError(f"engine exited (code {self.proc.poll()}); log: {self.log_path}")
                if line.startswith(b"@@"):
                    return dict(json.loads(line[2:]))
            elif self.proc.poll() is not None:
                raise KVStoreError(f"engine exited (code {self.proc.returncode}); log: {self.log_path}")

    def send(self, op: str, **kw: Any) -> None:
        """Send a command without waiting; :meth:`result` reads its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()

    def result(self, op: str = "command", timeout: float = 600.0) -> dict[str, Any]:
        out = self._read(timeout)
        if "error" in out:
            raise KVStoreError(f"engine {op} failed: {out['error']}")
        return out

    def call(self, op: str, timeout: float = 600.0, **kw: Any) -> dict[str, Any]:
        self.send(op, **kw)
        out = self._read(timeout)
        if "error" in out:
            raise KVStoreError(f"engine {op} failed: {out['error']}")
        return out

    def generate(self, prompts: list[list[int]], max_tokens: int = 8, *,
                 params: list[dict[str, Any] | None] | None = None, timeout: float = 600.0,
                 lora: tuple[str, int, str] | None = None) -> dict[str, Any]:
        """Greedy generation; ``lora``: (name, id, path) of an adapter for every prompt
        (the engine must have been started with ``max_lora_rank``)."""
        return self.call("generate", timeout, prompts=prompts, max_tokens=max_tokens, params=params,
                         lora=list(lora) if lora else None)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("exit", timeout=30)
            except KVStoreError:
                pass  # the process is killed below either way
            try:  # a graceful exit: vLLM stops its workers (TP) and the connector flushes saves
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                log.warning("engine %d did not exit within 20 s of 'exit'; killing it", self.proc.pid)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- child side -------------------------------------------------------------------------

_REPLY_FD: list[int] = []


def _reply(obj: dict[str, Any]) -> None:
    os.write(_REPLY_FD[0], ("@@" + json.dumps(obj) + "\n").encode())


def _connectors(llm: Any) -> tuple[Any, Any]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    worker = get_kv_transfer_group() if has_kv_transfer_group() else None
    core = llm.llm_engine.engine_core
    core = getattr(core, "engine_core", core)
    sched = core.scheduler.get_kv_connector() if hasattr(core, "scheduler") else None
    return sched, worker


def _stats(llm: Any) -> dict[str, Any]:
    sched, worker = _connectors(llm)
    out: dict[str, Any] = {}
    for name, c in (("scheduler", sched), ("worker", worker)):
        if c is not None and hasattr(c, "stats"):
            out[name] = c.stats()
    return out


def _wait_idle(llm: Any) -> None:
    _, worker = _connectors(llm)
    if worker is not None and getattr(worker, "worker", None) is not None:
        worker.worker.wait_idle()


def _main(cfg: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw: dict[str, Any] = {}
    if cfg.get("kv"):
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(**cfg["kv"])
    if cfg.get("kv_events"):
        from vllm.config import KVEventsConfig

        kw["kv_events_config"] = KVEventsConfig(**cfg["kv_events"])
    if cfg.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = cfg["max_num_batched_tokens"]
    if cfg.get("tensor_parallel_size", 1) > 1:
        kw.update(tensor_parallel_size=cfg["tensor_parallel_size"], distributed_executor_backend="mp")
    if cfg.get("max_lora_rank"):
        kw.update(enable_lora=True, max_lora_rank=cfg["max_lora_rank"], max_loras=2)
    if cfg.get("attention_backend"):
        kw["attention_backend"] = cfg["attention_backend"]
    if cfg.get("prefix_caching") is not None:
        kw["enable_prefix_caching"] = cfg["prefix_caching"]
    llm = LLM(model=cfg["model"], dtype=cfg.get("dtype", "float32"), enforce_eager=True, block_size=cfg.get("block_size", 32),
              max_model_len=cfg["max_model_len"], seed=0, **kw)
    _reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "exit":
            _wait_idle(llm)
            _reply({"ok": True})
            break
        try:
            if op == "generate":
                prompts, params = cmd["prompts"], cmd.get("params") or [None] * len(cmd["prompts"])
                sps = [SamplingParams(temperature=0, max_tokens=cmd["max_tokens"], ignore_eos=True,
                                      extra_args={"kv_transfer_params": p} if p else None) for p in params]
                lora = None
                if cmd.get("lora"):
                    from vllm.lora.request import LoRARequest

                    name, lid, path = cmd["lora"]
                    lora = LoRARequest(name, lid, path)
                t0 = time.perf_counter()
                outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sps, use_tqdm=False,
                                    lora_request=lora)
                dt = time.perf_counter() - t0
                ttft = []
                for o in outs:
                    m = getattr(o, "metrics", None)
                    ttft.append(getattr(m, "first_token_latency", None) if m is not None else None)
                _reply({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                        "params": [o.kv_transfer_params for o in outs], "seconds": dt, "ttft": ttft})
            elif op == "stats":
                _reply(_stats(llm))
            elif op == "handshake":
                _, worker = _connectors(llm)
                hs = getattr(getattr(worker, "worker", None), "handshake", None)
                _reply(dataclasses.asdict(hs) if hs is not None else {"error": "no kvstore connector"})
            elif op == "wait_idle":
                _wait_idle(llm)
                _reply({"ok": True})
            elif op == "reset_prefix_cache":  # the next run of a prompt must come from the pool
                _reply({"ok": bool(llm.reset_prefix_cache())})
            else:
                _reply({"error": f"unknown op {op!r}"})
        except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
            _reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    # Replies go to the original stdout; everything vLLM prints goes to stderr (the log).
    _REPLY_FD.append(os.dup(1))
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _main(json.loads(sys.argv[1]))
