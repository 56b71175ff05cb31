"""The sidebar's comm, kernel side: a recording comm (as ipywidgets' tests use) on the real manager
with the real default model, and the real thing through a running kernel (jupyter_client)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jupyter_llm.manager import ModelManager
from jupyter_llm.notebook.comm import TARGET, CommHub, jsonable, load_options


class RecordingComm:
    """Stands in for an ipykernel comm: records what is sent, lets a test deliver messages."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.closed = False
        self._on_msg: Any = None
        self._on_close: Any = None
        self._cond = threading.Condition()

    def send(self, data: Any = None, metadata: Any = None, buffers: Any = None) -> None:
        with self._cond:
            self.sent.append(data)
            self._cond.notify_all()

    def on_msg(self, callback: Any) -> None:
        self._on_msg = callback

    def on_close(self, callback: Any) -> None:
        self._on_close = callback

    def close(self, data: Any = None) -> None:
        self.closed = True

    def deliver(self, data: dict[str, Any]) -> None:
        """The panel sends a comm message."""
        self._on_msg({"content": {"comm_id": "c1", "data": data}})

    def close_from_panel(self) -> None:
        self._on_close({"content": {"comm_id": "c1", "data": {}}})

    def wait_for(self, predicate: Any, timeout: float = 120.0) -> dict[str, Any]:
        """The first message (in order) matching ``predicate``, waiting for it if needed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.sent:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message in {[m.get('kind') for m in self.sent]}")
                self._cond.wait(left)

    def state_after(self, request_id: str, predicate: Any) -> dict[str, Any]:
        """The first pushed state after the reply to ``request_id`` that matches ``predicate``."""
        reply = self.reply(request_id)
        return self.wait_for(lambda m: m.get("kind") == "state" and _index(self.sent, m) > _index(self.sent, reply)
                             and predicate(m["state"]))

    def reply(self, request_id: str, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_for(lambda m: m.get("kind") == "reply" and m.get("id") == request_id, timeout)

    def request(self, request_id: str, action: str, **args: Any) -> dict[str, Any]:
        self.deliver({"kind": "request", "id": request_id, "action": action, "args": args})
        return self.reply(request_id)


def _index(messages: list[dict[str, Any]], message: dict[str, Any]) -> int:
    return next(i for i, m in enumerate(messages) if m is message)


@pytest.fixture
def hub(manager: ModelManager) -> Any:
    hub = CommHub(manager, interval=0.05, refresh=0)
    yield hub
    hub.close()


def test_attach_says_hello_with_the_managers_state_and_aliases(hub: CommHub) -> None:
    comm = RecordingComm()
    hub.attach(comm, {"kind": "hello", "protocol": 1, "refresh": 0})
    hello = comm.sent[0]
    assert hello["kind"] == "hello"
    assert [m["name"] for m in hello["state"]["models"]] == ["smollm2"]
    assert hello["state"]["loaded"] == [] and hello["state"]["pulls"] == []
    assert hello["state"]["devices"][0]["id"] == "CPU"
    assert "smollm2" in {a["name"] for a in hello["aliases"]}
    assert hello["refresh"] == 0


def test_estimate_request_reprices_with_the_options(hub: CommHub) -> None:
    comm = RecordingComm()
    hub.attach(comm)
    small = comm.request("e1", "estimate", name="smollm2", options={"n_ctx": 2048, "gpu_layers": 0})
    large = comm.request("e2", "estimate", name="smollm2", options={"n_ctx": 8192, "gpu_layers": 0,
                                                                    "kv_type": "q8_0", "flash_attn": True})
    assert small["ok"] and large["ok"]
    cpu_small = small["result"]["devices"][0]
    cpu_large = large["result"]["devices"][0]
    assert cpu_small["device_id"] == "CPU" and cpu_small["fits"] is True
    assert cpu_small["weights"] == cpu_large["weights"]
    # q8_0 KV at 4x the context: 4 * 34/64 = 2.125x the f16 KV bytes
    assert cpu_large["kv"] == pytest.approx(cpu_small["kv"] * 4 * 34 / 64, rel=0.01)


def test_load_and_unload_from_the_panel_push_state(hub: CommHub) -> None:
    comm = RecordingComm()
    hub.attach(comm)
    loaded = comm.request("l1", "load", name="smollm2", options={"n_ctx": 2048, "gpu_layers": 0})
    assert loaded["ok"], loaded
    assert loaded["result"]["name"] == "smollm2" and loaded["result"]["pid"] > 0
    state = comm.wait_for(lambda m: m.get("kind") == "state" and m["state"]["loaded"])["state"]
    model = state["loaded"][0]
    assert model["measured"]["CPU"]["weights"] > 90_000_000
    assert model["estimate"]["devices"][0]["device_id"] == "CPU"
    assert comm.wait_for(lambda m: m.get("kind") == "event" and m["event"]["type"] == "loaded")

    unloaded = comm.request("u1", "unload", name="smollm2")
    assert unloaded == {"kind": "reply", "id": "u1", "ok": True, "result": ["smollm2"]}
    comm.state_after("u1", lambda state: not state["loaded"])


def test_errors_come_back_with_their_type_and_what_to_do(hub: CommHub) -> None:
    comm = RecordingComm()
    hub.attach(comm)
    missing = comm.request("x1", "estimate", name="no-such-model-here", options={})
    assert missing["ok"] is False
    assert missing["error"]["type"] == "ModelNotFoundError"
    assert "%llm" in missing["error"]["message"]
    bad = comm.request("x2", "load", name="smollm2", options={"n_ctx": 8})
    assert bad["error"]["type"] == "ValueError" and "n_ctx" in bad["error"]["message"]
    unknown = comm.request("x3", "teleport", name="smollm2")
    assert "unknown request 'teleport'" in unknown["error"]["message"]
    nameless = comm.request("x4", "pull")
    assert "model name is needed" in nameless["error"]["message"]


def test_a_load_that_will_not_fit_sends_the_estimate_back(hub: CommHub) -> None:
    comm = RecordingComm()
    hub.attach(comm)
    # a context far beyond RAM: refused before any worker starts, with the numbers
    reply = comm.request("w1", "load", name="smollm2", options={"n_ctx": 8_000_000, "gpu_layers": 0})
    assert reply["error"]["type"] == "WontFitError"
    assert reply["error"]["estimate"]["fits"] is False
    assert hub.manager.ps() == []


def test_the_panel_starts_and_stops_the_api_server(hub: CommHub) -> None:
    import urllib.error
    import urllib.request

    comm = RecordingComm()
    hub.attach(comm)
    started = comm.request("s1", "serve", port=0)  # 0: any free port
    assert started["ok"], started
    status = started["result"]
    assert status["running"] is True and status["url"].startswith("http://127.0.0.1:")
    assert status["token"]
    comm.wait_for(lambda m: m.get("kind") == "state" and (m["state"]["server"] or {}).get("running"))
    # the token the panel copies is the one the server wants
    request = urllib.request.Request(f"{status['url']}/api/tags",
                                     headers={"Authorization": f"Bearer {status['token']}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{status['url']}/api/tags", timeout=10)
    assert refused.value.code == 401
    refused.value.close()

    stopped = comm.request("s2", "stop")
    assert stopped["result"] == {"stopped": True}
    comm.state_after("s2", lambda state: state["server"] is None)
    bad = comm.request("s3", "serve", port="eleven")
    assert bad["ok"] is False and "port" in bad["error"]["message"]


def test_a_burst_of_events_is_coalesced_into_a_few_pushes(manager: ModelManager) -> None:
    hub = CommHub(manager, interval=0.25, refresh=0)
    comm = RecordingComm()
    hub.attach(comm)
    try:
        start = hub.pushes
        # what a pull does to the manager: hundreds of progress events in a moment
        for i in range(500):
            manager._emit("pull", progress={"name": "x", "status": "downloading", "completed": i, "total": 500})
        comm.wait_for(lambda m: m.get("kind") == "state", timeout=10)
        time.sleep(0.6)
        pushes = hub.pushes - start
        assert 1 <= pushes <= 4, pushes
    finally:
        hub.close()


def test_periodic_refresh_pushes_only_when_asked(manager: ModelManager) -> None:
    quiet = CommHub(manager, interval=0.01, refresh=0)
    comm = RecordingComm()
    quiet.attach(comm)
    time.sleep(0.3)
    assert quiet.pushes == 0
    reply = comm.request("c1", "configure", refresh=0.05)
    assert reply["result"] == {"refresh": 0.05}
    comm.wait_for(lambda m: m.get("kind") == "state", timeout=10)
    time.sleep(0.3)
    assert quiet.pushes >= 3
    quiet.close()


def test_closing_the_last_comm_stops_listening(manager: ModelManager) -> None:
    hub = CommHub(manager, interval=0.01, refresh=0.05)
    first, second = RecordingComm(), RecordingComm()
    hub.attach(first)
    view = hub.attach(second)
    first.close_from_panel()
    assert hub.views == [view]
    second.close_from_panel()
    assert hub.views == []
    assert manager._listeners == []
    deadline = time.monotonic() + 5
    while hub._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hub._thread is None
    # a new panel brings it back
    third = RecordingComm()
    hub.attach(third)
    third.wait_for(lambda m: m.get("kind") == "state", timeout=10)
    hub.close()
    assert third.closed


def test_load_options_from_json_are_validated() -> None:
    options = load_options({"gpu_layers": "auto", "n_ctx": 4096, "kv_type": "q8_0", "flash_attn": True,
                            "tensor_split": [1, 1]})
    assert options.tensor_split == (1, 1) and options.gpu_layers == "auto"
    with pytest.raises(ValueError, match="unknown load option"):
        load_options({"n_gpu": 3})


def test_rpc_servers_from_the_panel_are_priced_and_bad_ones_answered(hub: CommHub) -> None:
    from tests.llamacpp import rpc_server

    comm = RecordingComm()
    hub.attach(comm)
    with rpc_server() as server:
        priced = comm.request("r1", "estimate", name="smollm2",
                              options={"gpu_layers": 31, "n_ctx": 2048, "rpc": [server.endpoint]})
    assert priced["ok"], priced
    rows = {r["device_id"]: r for r in priced["result"]["devices"]}
    assert rows[f"RPC0[{server.endpoint}]"]["total"] > 0  # the layers went to the rpc-server's device
    assert priced["result"]["options"]["rpc"] == [server.endpoint]
    assert "warnings" not in priced["result"]  # loopback: nothing to warn about
    for bad, says in (["no-port"], "HOST:PORT"), (5, "list of"), (["127.0.0.1:70000"], "outside 1-65535"):
        reply = comm.request(f"r-{bad}", "estimate", name="smollm2", options={"rpc": bad})
        assert reply["ok"] is False and reply["error"]["type"] == "ValueError", reply
        assert says in reply["error"]["message"]


def test_an_rpc_server_named_by_host_name_is_warned_about_in_the_reply(hub: CommHub) -> None:
    import socket

    from tests.llamacpp import rpc_server

    name = socket.gethostname().lower()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        address = ""
    if address != "127.0.0.1":
        pytest.skip(f"this machine's name {name!r} does not resolve to 127.0.0.1, where the rpc-server listens")
    comm = RecordingComm()
    hub.attach(comm)
    with rpc_server() as server:
        port = server.endpoint.rpartition(":")[2]
        # a host name's address is not resolved to check it: the panel is told what the kernel warns
        reply = comm.request("h1", "estimate", name="smollm2",
                             options={"gpu_layers": 31, "n_ctx": 2048, "rpc": [f"{name}:{port}"]})
    assert reply["ok"], reply
    [warning] = reply["result"]["warnings"]
    assert f"{name}:{port}" in warning and "no authentication" in warning


def test_jsonable_turns_paths_tuples_and_infinities_into_json() -> None:
    assert jsonable({"p": Path("/x"), "t": (1, 2), "inf": float("inf"), 3: {"s"}}) == {
        "p": "/x", "t": [1, 2], "inf": None, "3": ["s"]}


# -- through a real kernel -------------------------------------------------------------------


def _iopub(kc: Any, predicate: Any, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no such iopub message")
        try:
            msg = kc.get_iopub_msg(timeout=left)
        except queue.Empty:
            continue
        if predicate(msg):
            return msg


@pytest.mark.slow
def test_a_real_kernel_opens_the_comm_and_answers_a_panel(smollm2_path: Path, isolated_state: Path) -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3")
    try:
        code = (
            "from pathlib import Path\n"
            "from jupyter_llm.manager import get_manager\n"
            "from jupyter_llm.store.sources import Pulled\n"
            f"get_manager().store.put('smollm2', Pulled('pip', [Path({str(smollm2_path)!r})], owned=[]))\n"
            "from jupyter_llm.notebook.comm import open_from_kernel\n"
            "open_from_kernel(get_ipython())\n"
        )
        kc.execute(code)
        opened = _iopub(kc, lambda m: m["msg_type"] == "comm_open")
        assert opened["content"]["target_name"] == TARGET
        comm_id = opened["content"]["comm_id"]
        hello = _iopub(kc, lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == comm_id)
        data = hello["content"]["data"]
        assert data["kind"] == "hello"
        assert [m["name"] for m in data["state"]["models"]] == ["smollm2"]
        assert data["refresh"] == 0  # no periodic pushes until a panel asks for them

        # a reloaded page opens its own comm; the kernel answers on it
        own = "panel-comm-1"
        kc.session.send(kc.shell_channel.socket, kc.session.msg(
            "comm_open", {"comm_id": own, "target_name": TARGET, "data": {"kind": "hello", "protocol": 1}}))
        hello2 = _iopub(kc, lambda m: m["msg_type"] == "comm_msg" and m["content"]["comm_id"] == own)
        assert hello2["content"]["data"]["kind"] == "hello"
        kc.session.send(kc.shell_channel.socket, kc.session.msg("comm_msg", {"comm_id": own, "data": {
            "kind": "request", "id": "r1", "action": "estimate", "args": {"name": "smollm2", "options": {}}}}))
        reply = _iopub(kc, lambda m: m["msg_type"] == "comm_msg" and m["content"]["data"].get("kind") == "reply")
        assert reply["content"]["data"]["ok"] is True
        assert reply["content"]["data"]["result"]["devices"][0]["device_id"] == "CPU"

        # a kernel without the target refuses a panel's open with comm_close: "not loaded"
        kc.session.send(kc.shell_channel.socket, kc.session.msg(
            "comm_open", {"comm_id": "x", "target_name": "no_such_target", "data": {}}))
        closed = _iopub(kc, lambda m: m["msg_type"] == "comm_close")
        assert closed["content"]["comm_id"] == "x"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
