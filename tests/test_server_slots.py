"""The API decodes concurrent requests with its own number of slots, however the model was loaded."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from jupyter_llm import server as api
from jupyter_llm.manager import ModelManager
from jupyter_llm.options import LoadOptions
from jupyter_llm.store.records import Store
from jupyter_llm.store.sources import Pulled
from tests.apiserver import MODEL, auth, raw_request, wait_until, worker_stats
from tests.test_server_concurrency import LONG

PROMPTS = ["Write a haiku about the sea.", "List three fruits.", "What is 2+2? Explain.",
           "Tell me about Paris in two sentences."]


def _manager(model_path: Path, root: Path) -> ModelManager:
    manager = ModelManager(Store(root=root / "records"))
    manager.store.put(MODEL, Pulled("pip", [model_path], owned=[]))
    return manager


def test_a_model_loaded_with_one_slot_is_reloaded_with_the_servers_slots_keeping_its_options(
        smollm2_path: Path, tmp_path: Path) -> None:
    manager = _manager(smollm2_path, tmp_path)
    try:
        manager.load(MODEL, LoadOptions(n_ctx=1024, parallel=1, kv_type="q8_0", flash_attn=True, keep_alive=600))
        server = api.serve(manager, port=0, parallel=4, max_queue=2)
        banner = server.instructions()
        assert "smollm2 is loaded with 1 slot" in banner and "reloaded with 4" in banner
        first = threading.Barrier(len(PROMPTS) + 1, timeout=120)
        finished: list[int] = []
        lock = threading.Lock()

        def stream(i: int) -> str:
            parts = []
            with httpx.Client(base_url=server.url, headers=auth(server), timeout=180) as client:
                body = {"model": MODEL, "prompt": PROMPTS[i], "options": {"temperature": 0, "num_predict": 40}}
                with client.stream("POST", "/api/generate", json=body) as r:
                    r.raise_for_status()
                    for n, line in enumerate(r.iter_lines()):
                        if line:
                            parts.append(json.loads(line).get("response", ""))
                        if n == 0:
                            first.wait()  # every stream's first token before any stream goes on
            with lock:
                finished.append(i)
            return "".join(parts)

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(stream, i) for i in range(len(PROMPTS))]
            try:
                first.wait()  # broken if the streams ran one after another
            except threading.BrokenBarrierError:
                pytest.fail(f"the four streams did not overlap: {[f.exception(timeout=180) for f in futures]}")
            assert not finished  # all four first tokens arrived before any stream finished
            answers = [f.result() for f in futures]
        assert all(answers)
        model = manager.get(MODEL)
        assert model.options.parallel == 4 and worker_stats(manager)["slots"] == 4
        assert model.options.n_ctx == 4 * 1024  # the per-request context the user had
        assert (model.options.kv_type, model.options.flash_attn, model.options.keep_alive) == ("q8_0", True, 600)
        assert any("4 slots" in n and "1 slot" in n for n in model.notices)
        assert manager.remembered_options(MODEL) == LoadOptions(n_ctx=1024, parallel=1, kv_type="q8_0",
                                                               flash_attn=True, keep_alive=600)
        assert server.status()["models"][MODEL]["slots"] == 4
    finally:
        api.stop(manager)
        manager.close()


def test_with_parallel_1_the_server_uses_one_slot_and_its_503_says_so(smollm2_path: Path, tmp_path: Path) -> None:
    manager = _manager(smollm2_path, tmp_path)
    held: list[Any] = []
    try:
        manager.load(MODEL, LoadOptions(n_ctx=4 * 2048, parallel=4))  # 2048 per slot: LONG fits
        server = api.serve(manager, port=0, parallel=1, max_queue=1)
        held = [raw_request(server, "/api/generate", LONG) for _ in range(2)]  # 1 slot + 1 queued
        assert wait_until(lambda: server.context.backend.in_flight().get(MODEL) == 2, timeout=30)
        assert wait_until(lambda: worker_stats(manager)["busy"] == 1, timeout=30)
        with httpx.Client(base_url=server.url, headers=auth(server), timeout=30) as client:
            refused = client.post("/api/generate", json=LONG)
        assert refused.status_code == 503
        assert "1 slot and 1 queued" in refused.json()["error"]
        assert worker_stats(manager)["busy"] == 1  # the second waits for the server's one slot
    finally:
        for sock in held:
            sock.close()
        api.stop(manager)
        manager.close()
