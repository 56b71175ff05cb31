"""``jupyter-llm`` (or ``python -m jupyter_llm``): Ollama's verbs in a terminal.

::

    jupyter-llm serve [--host H[:P]] [--port P]   the API (Ollama's and OpenAI's) until Ctrl-C or
                                                  SIGTERM; models load on demand
    jupyter-llm run MODEL [PROMPT]                chat, streaming: one answer for a prompt, else a
                                                  loop over the lines of stdin until EOF (or /bye)
    jupyter-llm ps | stop MODEL                   a running server's loaded models / unload one now
    jupyter-llm pull|list|show|rm|cp|devices|estimate …   the store verbs of ``%llm``, in this process
    jupyter-llm --version

The verbs that talk to a server find it at ``--host``, else ``$OLLAMA_HOST``, else
127.0.0.1:11434 (Ollama's). ``run`` without a server there runs the model in its own process
and says so. The token comes from ``$JUPYTER_LLM_TOKEN``; without it ``serve`` makes one and
leaves it, for this user's other ``jupyter-llm`` commands only, in a server file in Jupyter's
runtime directory (mode 0600, removed when the server stops). It is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from . import config
from ._version import __version__
from .options import DEFAULT_HOST, DEFAULT_MAX_QUEUE, DEFAULT_PARALLEL, DEFAULT_PORT

STORE_VERBS = ("pull", "list", "ls", "show", "rm", "cp", "devices", "estimate", "help")
"""Verbs run as the ``%llm`` magic runs them (they need no server)."""
_TOKEN_VARIABLE = "JUPYTER_LLM_TOKEN"


class CLIError(Exception):
    """A failure the user can act on: printed as one line, exit status 1."""


def main(argv: list[str] | None = None) -> int:
    """Run one verb; returns the exit status (0 done, 1 failed, 2 bad usage, 130 interrupted)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in STORE_VERBS:
        return _store_verb(args)
    parser = _parser()
    if not args:
        parser.print_help()
        return 0
    options = parser.parse_args(args)
    try:
        return int(options.handler(options))
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jupyter-llm", description="Local language models: the API server, a terminal chat, the store.",
        epilog=f"Store verbs (no server needed): {', '.join(STORE_VERBS)}; `jupyter-llm help` lists their options.")
    parser.add_argument("--version", action="version", version=f"jupyter-llm {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, handler: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=text, description=text)
        p.add_argument("--host", default=None, help="HOST[:PORT] of the server (default $OLLAMA_HOST or "
                                                    f"{DEFAULT_HOST}:{DEFAULT_PORT})")
        p.set_defaults(handler=handler)
        return p

    p = verb("serve", _serve, "serve the Ollama and OpenAI APIs until Ctrl-C or SIGTERM (models load on demand)")
    p.add_argument("--port", type=int, default=None, help="port (overrides one in --host)")
    p.add_argument("--parallel", "-np", type=int, default=None,
                   help=f"slots per model (default: $OLLAMA_NUM_PARALLEL, else {DEFAULT_PARALLEL})")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=DEFAULT_MAX_QUEUE)
    p.add_argument("--origin", dest="origins", action="append", default=None,
                   help="a web origin allowed (CORS; default: $JUPYTER_LLM_ORIGINS / $OLLAMA_ORIGINS)")
    p.add_argument("--no-auth", dest="no_auth", action="store_true", help="no token (loopback only)")
    p = verb("run", _run, "chat with a model in the terminal, streaming")
    p.add_argument("model")
    p.add_argument("prompt", nargs="*", help="answer this once; without it, each line of stdin is a message")
    p.add_argument("--system", default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    verb("ps", _ps, "models loaded in the running server")
    verb("stop", _stop, "unload a model from the running server now").add_argument("model")
    return parser


# -- the server -------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from .errors import ServerError
    from .manager import close_manager, get_manager
    from .server import serve

    host, port = _address(args.host, args.port)
    token = None if args.no_auth else config.api_token()
    try:
        server = serve(get_manager(), host=host, port=port, token=token, auth=not args.no_auth,
                       parallel=args.parallel, max_queue=args.max_queue, origins=args.origins)
    except ServerError as exc:
        close_manager()
        raise CLIError(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    info = server.token_file  # the server keeps its address and token there, for this user only
    print(f"jupyter-llm {__version__}: Ollama API at {server.url}, OpenAI API at {server.url}/v1, "
          f"{server.parallel} parallel slots per model; models load on demand.", flush=True)
    if info is None:
        print("No token: any program on this machine can use these models.", flush=True)
    else:
        source = f"${_TOKEN_VARIABLE}" if token else "generated"
        print(f"Token: {source}, kept for this user's jupyter-llm ps/run/stop in {info} (ollama and openai "
              f"clients take it as OLLAMA_API_KEY / api_key). Ctrl-C or SIGTERM stops the server.", flush=True)
    try:
        while not stop.wait(0.5):
            if not server.running:
                raise CLIError(f"the server stopped: {server.status().get('error') or 'unknown reason'}")
    finally:
        close_manager()  # stops the API first (which removes its file), then every worker
    return 0


def _address(host: str | None, port: int | None = None) -> tuple[str, int]:
    """``(host, port)`` from ``--host``, else ``$JUPYTER_LLM_HOST`` / ``$OLLAMA_HOST`` (Ollama's
    forms: ``HOST``, ``HOST:PORT``, ``:PORT``, ``http://HOST:PORT``), else Ollama's default address."""
    try:
        found_host, found_port = config.parse_address(host, "--host") if host else config.serve_address()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    return found_host or DEFAULT_HOST, port if port is not None else (found_port or DEFAULT_PORT)

def _server_file(port: int) -> Path:
    from jupyter_core.paths import jupyter_runtime_dir

    return Path(jupyter_runtime_dir()) / f"jupyter-llm-{port}.json"


# -- a client of the server -------------------------------------------------------------------------


class _Client:
    """Requests to a running server, with its token (never printed)."""

    def __init__(self, host: str | None) -> None:
        import httpx

        name, port = _address(host)
        self.url = f"http://{f'[{name}]' if ':' in name else name}:{port}"
        token = config.api_token() or _token_left_by_serve(port)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # reads wait long: the first request may load the model (and a pull may run before it)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(10.0, read=900.0))

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, json=body)
        except httpx.ConnectError:
            raise ServerUnreachable(self.url) from None
        self.check(response)
        return response.json()

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The NDJSON items of a streamed answer."""
        import httpx

        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    response.read()
                    self.check(response)
                for line in response.iter_lines():
                    if line.strip():
                        item = json.loads(line)
                        if item.get("error"):
                            raise CLIError(str(item["error"]))
                        yield item
        except httpx.ConnectError:
            raise ServerUnreachable(self.url) from None

    def check(self, response: Any) -> None:
        if response.status_code == 401:
            raise CLIError(f"the server at {self.url} refused the token: set {_TOKEN_VARIABLE} to the token it "
                           "was started with (a server this user started leaves it for these commands)")
        if response.status_code >= 400:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text
            raise HTTPStatusError(response.status_code, f"{self.url}: {message}")


class ServerUnreachable(CLIError):
    def __init__(self, url: str) -> None:
        super().__init__(f"no server at {url}: start one with `jupyter-llm serve` (or give --host HOST:PORT)")
        self.url = url


class HTTPStatusError(CLIError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _token_left_by_serve(port: int) -> str | None:
    try:
        info = json.loads(_server_file(port).read_text())
        os.kill(int(info["pid"]), 0)  # a file left by a server that died is no use
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return str(info.get("token") or "") or None


def _ps(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    models = _Client(args.host).request("GET", "/api/ps").get("models", [])
    rows = [("NAME", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL")]
    now = datetime.now(timezone.utc)
    for m in models:
        size, vram = int(m.get("size") or 0), int(m.get("size_vram") or 0)
        gpu = round(100 * vram / size) if size else 0
        processor = "100% CPU" if gpu == 0 else "100% GPU" if gpu == 100 else f"{100 - gpu}%/{gpu}% CPU/GPU"
        until = datetime.fromisoformat(str(m.get("expires_at")).replace("Z", "+00:00"))
        seconds = (until - now).total_seconds()
        left = "Forever" if until.year > 2300 else "Stopping…" if seconds <= 0 else f"{_duration(seconds)} from now"
        rows.append((m.get("name", ""), _size(size), processor, str(m.get("context_length") or ""), left))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("    ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _stop(args: argparse.Namespace) -> int:
    client = _Client(args.host)
    loaded = {m.get("name") for m in client.request("GET", "/api/ps").get("models", [])}
    if args.model not in loaded:
        raise CLIError(f"{args.model} is not loaded on the server at {client.url} (`jupyter-llm ps` lists "
                       "loaded models)")
    client.request("POST", "/api/generate", {"model": args.model, "keep_alive": 0})
    return 0


# -- run: a chat in the terminal ----------------------------------------------------------------------


Answer = Callable[[list[dict[str, str]]], Iterator[str]]


def _run(args: argparse.Namespace) -> int:
    client = _Client(args.host)
    try:
        client.request("GET", "/api/version")
    except ServerUnreachable as exc:
        print(f"no server at {exc.url}; running {args.model} in this process (`jupyter-llm serve` keeps models "
              "loaded between runs)", file=sys.stderr)
        return _run_here(args)
    options = {k: v for k, v in (("temperature", args.temperature), ("num_predict", args.max_tokens),
                                 ("seed", args.seed)) if v is not None}

    def answer(messages: list[dict[str, str]]) -> Iterator[str]:
        body = {"model": args.model, "messages": messages, "stream": True, "options": options}
        items = client.stream("/api/chat", body)
        try:
            first = next(items, None)
        except HTTPStatusError as exc:
            if exc.status != 404:
                raise
            print(f"pulling {args.model}…", file=sys.stderr)  # as `ollama run` pulls a missing model
            client.request("POST", "/api/pull", {"model": args.model, "stream": False})
            items = client.stream("/api/chat", body)
            first = next(items, None)
        if first is not None:  # taken first, so that a missing model is known before anything is printed
            yield first.get("message", {}).get("content", "")
        for item in items:
            yield item.get("message", {}).get("content", "")

    return _converse(args, answer)


def _run_here(args: argparse.Namespace) -> int:
    from .errors import JupyterLLMError
    from .manager import close_manager, get_manager
    from .options import SamplingOptions
    from .progress import TqdmListener

    manager = get_manager()
    try:
        model = manager.load(args.model, listeners=[TqdmListener()])
        defaults = SamplingOptions()
        sampling = SamplingOptions(
            temperature=defaults.temperature if args.temperature is None else args.temperature,
            max_tokens=defaults.max_tokens if args.max_tokens is None else args.max_tokens, seed=args.seed)

        def answer(messages: list[dict[str, str]]) -> Iterator[str]:
            for chunk in manager.stream_chat(model.name, messages, sampling):
                yield chunk.text

        return _converse(args, answer)
    except (JupyterLLMError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    finally:
        close_manager()


def _converse(args: argparse.Namespace, answer: Answer) -> int:
    """One answer to the prompt argument, else one per line of stdin (history kept) until EOF."""
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def turn(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = ""
        for piece in answer(messages):
            reply += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply})

    if args.prompt:
        turn(" ".join(args.prompt))
        return 0
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write(">>> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/bye":
            return 0
        if line.strip():
            turn(line.strip())


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)} seconds"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes"
    return f"{round(seconds / 3600)} hours"


# -- the store verbs --------------------------------------------------------------------------------


def _store_verb(argv: list[str]) -> int:
    """Run one ``%llm`` verb and print its result (text, as the magic's text/plain)."""
    from IPython.core.error import UsageError

    from .errors import JupyterLLMError
    from .manager import close_manager
    from .notebook.magics import LLMMagics

    line = " ".join(_quote(a) for a in argv)
    magics = LLMMagics(shell=None)
    try:
        result = cast(Any, magics).llm(line)  # IPython's decorator hides the signature from mypy
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except JupyterLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_manager()
    if result is not None:
        print(repr(result))
    return 0


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)


if __name__ == "__main__":
    sys.exit(main())
