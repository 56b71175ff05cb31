"""The JupyterLab sidebar for real: JupyterLab on a free loopback port, Debian's chromium driven by
playwright-core (labextension/ui-tests/sidebar.mjs), screenshots in test-artifacts/.

The flow: open a notebook whose kernel has not loaded jupyter_llm, load it from the panel's
button, pull the default model from the sidebar (by its local path, which resolves offline), load
it from the sidebar, chat in a cell with %%chat, show %llm mem and %llm picker, switch to the dark
theme, unload from the sidebar, reload the page and see the panel re-attach, then start the API
server from the sidebar, copy its token, call the API with it, and stop the server; switch to
another notebook (its kernel has not loaded jupyter_llm) and back; restart the kernel and load the
extension again from the panel.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from tests.llamacpp import rpc_server

ROOT = Path(__file__).resolve().parent.parent
EXT_SOURCE = ROOT / "labextension"
EXT_BUILD = ROOT / "jupyter_llm" / "labextension"
ARTIFACTS = Path(os.environ.get("ARTIFACTS", ROOT / "test-artifacts")) / "sidebar"
CHROMIUM = os.environ.get("JUPYTER_LLM_CHROMIUM", "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _jlpm() -> str:
    found = shutil.which("jlpm") or str(Path(sys.executable).parent / "jlpm")
    return found


def _build_is_stale() -> bool:
    built = EXT_BUILD / "package.json"
    if not built.exists():
        return True
    sources = [p for d in ("src", "style", "schema") for p in (EXT_SOURCE / d).rglob("*") if p.is_file()]
    return max(p.stat().st_mtime for p in sources) > built.stat().st_mtime


@pytest.fixture(scope="module")
def built_extension() -> Path:
    """The sidebar as built from labextension/ (rebuilt when a source is newer than the build)."""
    if _build_is_stale() or not (EXT_SOURCE / "node_modules" / "playwright-core").is_dir():
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        subprocess.run([_jlpm(), "install"], cwd=EXT_SOURCE, check=True, env=env)
        subprocess.run([_jlpm(), "build:prod"], cwd=EXT_SOURCE, check=True, env=env)
    return EXT_BUILD


@pytest.fixture(scope="module")
def chromium() -> str:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-browser.sh (as root), or set "
                    "JUPYTER_LLM_CHROMIUM to a Chromium binary")
    return CHROMIUM


@pytest.fixture
def lab(tmp_path: Path, built_extension: Path, isolated_state: Path) -> Iterator[dict[str, object]]:
    """JupyterLab on a free loopback port with a token, a temp root and fresh settings."""
    root, home = tmp_path / "root", tmp_path / "jupyter"
    root.mkdir()
    # this build of the sidebar, ahead of any installed copy (an editable install copies the
    # build at install time, so the installed one can be older than the source). JUPYTER_PATH
    # comes first; the user data dir would not (jupyter_core prefers a venv's own share/ to it)
    labext = home / "path" / "labextensions"
    labext.mkdir(parents=True)
    (labext / "jupyter-llm").symlink_to(built_extension, target_is_directory=True)
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # no "news" toast over the screenshots, no update check (there is no network)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), os.urandom(16).hex()
    env = {
        **os.environ,
        "JUPYTER_PATH": str(home / "path"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    log = open(tmp_path / "lab.log", "w")  # noqa: SIM115 — closed after the server stops
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0",
           "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"JupyterLab did not start:\n{(tmp_path / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "token": token, "root": root, "log": tmp_path / "lab.log", "profile": tmp_path / "profile"}
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _notebook(root: Path) -> str:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("jupyter_llm sidebar test"),
        nbformat.v4.new_code_cell("%%chat --max-tokens 24 --seed 1 --temperature 0\nName three colours."),
        nbformat.v4.new_code_cell("%llm mem"),
        nbformat.v4.new_code_cell("%llm picker"),
        nbformat.v4.new_code_cell(  # the kernel's own API as a remote: the token comes from a variable
            "import os\nfrom jupyter_llm.manager import get_manager\n"
            "os.environ['SELF_TOKEN'] = get_manager().server.token\n"
            "get_ipython().run_line_magic('llm', f'remote add self {get_manager().server.url} --api ollama "
            "--token-env SELF_TOKEN')\n"
            "get_ipython().run_line_magic('llm', 'remote add dead http://127.0.0.1:9 --api ollama')"),
    ]
    nbformat.write(nb, root / "sidebar.ipynb")
    other = nbformat.v4.new_notebook()
    other.metadata["kernelspec"] = nb.metadata["kernelspec"]
    other.cells = [nbformat.v4.new_code_cell("1 + 1")]
    nbformat.write(other, root / "other.ipynb")
    return "sidebar.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sidebar_pulls_loads_chats_and_unloads_in_a_real_browser(
        lab: dict[str, object], chromium: str, smollm2_path: Path) -> None:
    notebook = _notebook(lab["root"])  # type: ignore[arg-type]
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    env = {
        **os.environ,
        "LAB_URL": str(lab["url"]), "LAB_TOKEN": str(lab["token"]),
        "NOTEBOOK": notebook, "OTHER_NOTEBOOK": "other.ipynb",
        # a local path resolves offline; the sidebar's pull box takes any name %llm pull takes
        "PULL_NAME": str(smollm2_path), "ARTIFACTS": str(ARTIFACTS), "CHROMIUM": chromium,
        "PROFILE": str(lab["profile"]),
    }
    started = time.monotonic()
    with rpc_server() as rpc:  # priced from the load form's "RPC servers" field
        env["RPC_ENDPOINT"] = rpc.endpoint
        proc = subprocess.run(["node", str(EXT_SOURCE / "ui-tests" / "sidebar.mjs")], env=env, cwd=EXT_SOURCE,
                              capture_output=True, text=True, timeout=540)
    seconds = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"ok": False, "error": proc.stdout[-2000:]}
    (ARTIFACTS / "report.json").parent.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report.json").write_text(json.dumps({**report, "wall_seconds": seconds}, indent=2))
    if not report.get("ok"):
        server_log = Path(str(lab["log"])).read_text()[-4000:]
        pytest.fail(f"browser flow failed: {report.get('error')}\n--- steps: {report.get('steps')}\n"
                    f"--- node stderr:\n{proc.stderr[-3000:]}\n--- lab log:\n{server_log}")

    assert "%load_ext jupyter_llm" in report["banner"]
    model = report["model"]
    assert model and "Q4_1" in report["cached_caption"] and "93.8 MiB" in report["cached_caption"]
    assert "CPU: needs" in report["estimate_caption"]
    assert report["rpc_field"] and "RPC servers" in report["rpc_field"]
    assert f"RPC0[{rpc.endpoint}]: needs" in report["rpc_estimate"], report["rpc_estimate"]
    assert '"no-port" is not HOST:PORT' in report["rpc_error"]
    assert "ctx 2048" in report["loaded_card"] and "predicted" in report["loaded_card"]
    assert report["device_segments"][:3] == ["weights", "kv", "compute"]
    assert "tokens" in report["chat_output"] and "tok/s" in report["chat_output"]
    assert model in report["mem_widget"] and "measured" in report["mem_widget"]
    assert "as loaded: 0 GPU layers" in report["picker"] and "will not fit" not in report["picker"]
    assert "No model is loaded" in report["after_unload"]
    server = report["server"]
    assert server["url"].startswith("http://127.0.0.1:") and server["token_length"] >= 16
    assert (server["with_token"], server["without_token"]) == (200, 401)  # the copied token is the key
    assert f"self/{model}" in report["remotes"] and "reachable" in report["remotes"]
    assert "unreachable" in report["remotes"] and "http://127.0.0.1:9" in report["remotes"]
    assert report["other_label"].startswith("other.ipynb") and "not loaded" in report["other_label"]
    assert report["back_label"] == "sidebar.ipynb — connected"
    assert report["console_errors"] == []
    for path in report["screenshots"]:
        assert Path(path).stat().st_size > 10_000, path


@pytest.mark.slow
def test_labextension_list_shows_the_sidebar_enabled(built_extension: Path, tmp_path: Path) -> None:
    """What `pip install` put in share/jupyter/labextensions (not this test's symlink)."""
    out = subprocess.run([sys.executable, "-m", "jupyter", "labextension", "list"], capture_output=True,
                         text=True, env={**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path)}, timeout=120)
    text = out.stdout + out.stderr
    line = next((line for line in text.splitlines() if "jupyter-llm" in line), "")
    assert "enabled" in line and "OK" in line, text
