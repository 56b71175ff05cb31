"""Loads over llama.cpp's RPC backend: real rpc-servers on loopback, the real default model.

The servers are llama.cpp's own ``rpc-server`` (built by ``scripts/build-llama-cpp.sh``, which
``make test`` runs), each with a CPU device and one thread. Only loopback addresses are ever
connected to; the exposure warning is tested on the parser alone.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from jupyter_llm.errors import ModelLoadError, RpcServerError, WorkerCrashedError
from jupyter_llm.manager import ModelManager
from jupyter_llm.memory.rpc import query
from jupyter_llm.memory.rpc_endpoints import (
    RpcExposedWarning,
    exposure_warning,
    host_scope,
    parse_endpoint,
    parse_endpoints,
    warn_if_exposed,
)
from jupyter_llm.notebook.display import load_report
from jupyter_llm.options import LoadOptions, SamplingOptions
from jupyter_llm.store.sources import Pulled
from tests.kernel import Kernel
from tests.llamacpp import RpcServer, free_port, rpc_server
from tests.model import SHA256

PROMPT = "The three most useful kitchen tools are"
GREEDY = SamplingOptions(temperature=0.0, seed=11, max_tokens=32)


def _opts(**kw: object) -> LoadOptions:
    return LoadOptions(**{"gpu_layers": 99, "n_ctx": 512, "threads": 1, "keep_alive": None, **kw})  # type: ignore[arg-type]


@pytest.fixture
def servers() -> Iterator[list[RpcServer]]:
    with rpc_server() as a, rpc_server() as b:
        yield [a, b]


@pytest.fixture
def rpc_manager(smollm2_path: Path) -> Iterator[ModelManager]:
    """The default model under two names: one to load over RPC, one to load locally."""
    manager = ModelManager()
    for name in ("smollm2", "local"):
        manager.store.put(name, Pulled("pip", [smollm2_path], owned=[]))
    yield manager
    manager.close()


# -- endpoints and the exposure warning (no connection to anything) ----------------------------


def test_endpoints_are_parsed_once_into_normal_form() -> None:
    assert parse_endpoint(" LocalHost:50052 ") == "localhost:50052"
    assert parse_endpoints("127.0.0.1:1, 10.0.0.2:2,127.0.0.1:1") == ("127.0.0.1:1", "10.0.0.2:2")
    # a string as the magic's flag gives it, split at commas
    assert LoadOptions(rpc="127.0.0.1:5000,192.168.1.2:6000").rpc == (  # type: ignore[arg-type]
        "127.0.0.1:5000", "192.168.1.2:6000")
    assert LoadOptions(rpc=("127.0.0.1:5000",)).rpc == ("127.0.0.1:5000",)
    assert LoadOptions().rpc == ()
    for bad in ("127.0.0.1", "host:", ":50052", "host:port", "host:70000", "[::1]:50052", "::1:50052"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            LoadOptions(rpc=(bad,))


def test_the_magic_takes_rpc_and_tensor_split() -> None:
    from jupyter_llm.notebook.magics import _build_parser, load_options

    args = _build_parser().parse_args(["load", "smollm2", "--rpc", "127.0.0.1:1,127.0.0.1:2", "-ts", "3,1"])
    options = load_options(args)
    assert options.rpc == ("127.0.0.1:1", "127.0.0.1:2") and options.tensor_split == (3.0, 1.0)


def test_only_hosts_outside_loopback_and_private_networks_are_warned_about() -> None:
    assert [host_scope(h) for h in ("127.0.0.1", "localhost", "10.1.2.3", "192.168.0.9", "172.16.5.5",
                                    "169.254.1.1", "1.2.3.4", "gpu-box.example")] == [
        "loopback", "loopback", "private", "private", "private", "private", "public", "unknown"]
    assert exposure_warning(["127.0.0.1:1", "192.168.1.5:50052"]) is None
    message = exposure_warning(["127.0.0.1:1", "1.2.3.4:50052", "gpu-box.example:50052"])
    assert message is not None
    assert "1.2.3.4:50052" in message and "gpu-box.example:50052" in message and "127.0.0.1:1" not in message
    assert "no authentication" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_exposed(["10.0.0.1:1"])
        warn_if_exposed(["1.2.3.4:50052"])
    assert [type(w.message) for w in caught] == [RpcExposedWarning]


def test_the_installed_llama_cpp_has_the_rpc_backend() -> None:
    # in a subprocess: libllama is never loaded into a kernel-side process
    out = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.llama_supports_rpc())"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", "llama-cpp-python was built without -DGGML_RPC=ON: run make install"


# -- real rpc-servers ---------------------------------------------------------------------------


def test_a_server_reports_its_device_memory(servers: list[RpcServer]) -> None:
    (device,) = query(servers[0].endpoint)
    assert device.endpoint == servers[0].endpoint and device.index == 0
    assert 0 < device.free_bytes <= device.total_bytes
    assert device.backend == f"RPC0[{servers[0].endpoint}]"


def test_rpc_load_answers_like_a_local_load_and_shows_its_devices(rpc_manager: ModelManager,
                                                                   servers: list[RpcServer]) -> None:
    endpoints = [s.endpoint for s in servers]
    remote = rpc_manager.load("smollm2", _opts(rpc=endpoints))
    local = rpc_manager.load("local", _opts())
    remote_text = remote.runtime.generate(PROMPT, GREEDY).result.text
    local_text = local.runtime.generate(PROMPT, GREEDY).result.text
    assert remote_text and remote_text == local_text

    ids = [f"RPC0[{e}]" for e in endpoints]
    report = remote.report
    assert report is not None
    assert [d["endpoint"] for d in report.metadata["rpc_devices"]] == endpoints
    assert all(d["total"] > 0 for d in report.metadata["rpc_devices"])
    for device_id in ids:  # all layers offloaded: both servers hold weights
        assert report.breakdown[device_id].weights > 0
    assert report.n_gpu_layers == report.n_layer + 1
    assert local.report is not None and not any(k.startswith("RPC") for k in local.report.breakdown)

    # the estimate priced the same devices, and the load table lists them beside it
    assert remote.estimate is not None
    assert [r.device_id for r in remote.estimate.devices if r.device_id.startswith("RPC")] == ids
    assert all(remote.estimate.device(i).weights > 0 for i in ids)
    table = load_report(remote)
    assert {row[0] for row in table.rows} >= {"CPU", *ids}

    # %llm mem and the sidebar render the snapshot: the rpc devices with their host
    snapshot = rpc_manager.snapshot()
    listed = {d["id"]: d for d in snapshot["devices"] if d.get("host")}
    assert set(listed) == set(ids)
    assert [listed[i]["host"] for i in ids] == endpoints and all(listed[i]["total_bytes"] > 0 for i in ids)
    (loaded,) = [m for m in snapshot["loaded"] if m["name"] == "smollm2"]
    assert set(loaded["measured"]) >= set(ids)


def test_the_picker_prices_and_the_memory_widget_draws_rpc_devices(rpc_manager: ModelManager,
                                                                   servers: list[RpcServer]) -> None:
    from jupyter_llm.notebook.picker import picker
    from jupyter_llm.notebook.widgets import memory_html

    view = picker(rpc_manager)
    try:
        view.gpu_auto.value = False
        view.gpu_layers.value = view.gpu_layers.max
        view.rpc.value = f"{servers[0].endpoint}, {servers[1].endpoint}"
        assert view.options().rpc == (servers[0].endpoint, servers[1].endpoint)
        assert view.estimate is not None
        assert {f"RPC0[{s.endpoint}]" for s in servers} <= {r.device_id for r in view.estimate.devices}
        view.rpc.value = "no-port"
        assert view.estimate is None and "HOST:PORT" in view.estimate_view.value
    finally:
        view.close()
    rpc_manager.load("smollm2", _opts(rpc=[servers[0].endpoint]))
    drawn = memory_html(rpc_manager.snapshot(), None)
    assert f"RPC0[{servers[0].endpoint}]" in drawn and f"rpc-server {servers[0].endpoint}" in drawn


def test_a_dead_endpoint_fails_the_load_by_name(rpc_manager: ModelManager, servers: list[RpcServer]) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(ModelLoadError, match=dead) as info:
        rpc_manager.load("smollm2", _opts(rpc=[servers[0].endpoint, dead]))
    assert isinstance(info.value, RpcServerError) and info.value.endpoint == dead
    assert "is rpc-server running there" in str(info.value)
    assert not rpc_manager.is_loaded("smollm2")
    # the live server was not left holding anything: a load on it alone works
    assert rpc_manager.load("smollm2", _opts(rpc=[servers[0].endpoint])).report is not None


def test_a_server_in_use_by_another_model_is_named_busy(rpc_manager: ModelManager,
                                                        servers: list[RpcServer]) -> None:
    rpc_manager.load("smollm2", _opts(rpc=[servers[0].endpoint]))
    # an rpc-server serves one client at a time: a second model on it would wait forever
    with pytest.raises(RpcServerError, match="one client at a time") as info:
        rpc_manager.load("local", _opts(rpc=[servers[0].endpoint]))
    assert info.value.endpoint == servers[0].endpoint
    assert rpc_manager.is_loaded("smollm2") and not rpc_manager.is_loaded("local")


def test_a_server_killed_mid_generation_fails_that_stream_only(rpc_manager: ModelManager,
                                                               servers: list[RpcServer]) -> None:
    remote = rpc_manager.load("smollm2", _opts(rpc=[s.endpoint for s in servers]))
    local = rpc_manager.load("local", _opts())
    stream = remote.runtime.generate("Once upon a time", SamplingOptions(temperature=0.0, seed=3, max_tokens=400))
    chunks = 0
    with pytest.raises(WorkerCrashedError) as info:
        for _ in stream:
            chunks += 1
            if chunks == 3:
                servers[1].kill()
    assert chunks >= 3
    message = str(info.value)
    assert f"rpc-server at {servers[1].endpoint} is gone" in message, message
    assert "is rpc-server still running there?" in message
    assert local.runtime.generate(PROMPT, GREEDY).result.text  # the other model keeps answering


@pytest.mark.slow
def test_in_a_kernel_a_dead_server_is_an_error_in_the_cell_and_the_kernel_lives(
        tmp_path: Path, smollm2_path: Path, servers: list[RpcServer]) -> None:
    env = {"JUPYTER_LLM_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "OLLAMA_MODELS": str(tmp_path / "ollama"), "JUPYTER_LLM_HF_ENDPOINT": "http://127.0.0.1:9"}
    kernel = Kernel(env)
    try:
        kernel.ok("%load_ext jupyter_llm")
        kernel.ok(f"""
from pathlib import Path
from jupyter_llm.manager import get_manager
from jupyter_llm.store.sources import Pulled
for name in ("smollm2", "local"):
    get_manager().store.put(name, Pulled("pip", [Path({str(smollm2_path)!r})], sha256={SHA256!r}, owned=[]))
""")
        endpoints = ",".join(s.endpoint for s in servers)
        kernel.ok(f"%llm load smollm2 --rpc {endpoints} --gpu-layers 99 --ctx 512 --threads 1 --keep-alive -1")
        kernel.ok("%llm load local --ctx 512 --threads 1 --keep-alive -1")
        run = kernel.run(f"""
import os, signal, jupyter_llm
n = 0
for piece in jupyter_llm.Model("smollm2").generate("Once upon a time", stream=True, max_tokens=400,
                                                    temperature=0):
    n += 1
    if n == 3:
        os.kill({servers[0].proc.pid}, signal.SIGKILL)
""")
        assert run.status == "error"
        assert "WorkerCrashedError" in (run.error or "") and servers[0].endpoint in (run.error or "")
        kernel.alive_check()
        answer = kernel.ok('print(jupyter_llm.Model("local").generate("Hello", max_tokens=8, temperature=0))')
        assert "".join(answer.texts()).strip()
    finally:
        kernel.close()
