"""The errors jupyter_llm raises: one tree, each message says what to do next.

::

    JupyterLLMError
    ├── ModelNotFoundError (+ LookupError)      unknown name; lists the nearest matches
    ├── AmbiguousModelError (+ LookupError)     a quant tag matches several files; lists them
    ├── AliasFileError (+ ValueError)           the user's alias file is malformed; names the problem
    ├── PullError
    │   ├── HostUnreachableError (+ ConnectionError)   DNS/connect failed: fails fast, never retried long
    │   ├── RemoteError (+ ConnectionError)     the server answered with an error we cannot retry
    │   ├── IntegrityError                      sha256 or size mismatch; the partial is discarded
    │   └── InsufficientSpaceError (+ OSError)  not enough free disk for the download
    ├── GGUFError (+ ValueError)                not a GGUF file, or a corrupt one
    │   └── TruncatedGGUFError                  tensor data runs past the end of the file
    ├── StoreError (+ OSError)                  the store refuses an operation (read-only, in use)
    ├── ModelfileError (+ ValueError)           a Modelfile (or /api/create body) is wrong; names the line
    ├── ModelLoadError                          the worker could not load the model
    │   ├── WontFitError                        the estimate says it will not fit; with the numbers
    │   └── RpcServerError (+ ConnectionError)  an rpc-server refused, silent or busy; names host:port
    ├── WorkerCrashedError                      the worker process died (signal, llama.cpp's last line)
    ├── ContextOverflowError                    a prompt does not fit into the context
    ├── CapabilityError (+ ValueError)          the model cannot do what was asked (insert, thinking…)
    ├── ServerError                             the background API could not start or stop
    └── RemoteEngineError (+ ConnectionError)   a remote engine is unreachable or refused; names its address

Every class may also inherit the standard-library class a caller would naturally catch, so
``except ConnectionError`` or ``except LookupError`` keep working.
"""

from __future__ import annotations


class JupyterLLMError(Exception):
    """Root of every error jupyter_llm raises on purpose."""


class ModelNotFoundError(JupyterLLMError, LookupError):
    """A model name that is neither cached, an alias, nor a valid reference."""

    def __init__(self, message: str, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.suggestions = list(suggestions or [])

    def __str__(self) -> str:  # LookupError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class AmbiguousModelError(JupyterLLMError, LookupError):
    """A reference that matches several files; the candidates are listed."""

    def __init__(self, message: str, candidates: list[str] | None = None) -> None:
        super().__init__(message)
        self.candidates = list(candidates or [])

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class AliasFileError(JupyterLLMError, ValueError):
    """The user's alias file is not valid JSON of the documented shape."""


class PullError(JupyterLLMError):
    """A pull failed; what was downloaded so far is kept for the next attempt unless said."""


class HostUnreachableError(PullError, ConnectionError):
    """The host could not be resolved or connected to."""


class RemoteError(PullError, ConnectionError):
    """The server answered with an error that retrying will not fix."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class IntegrityError(PullError):
    """Downloaded bytes do not match the size or sha256 the source promised."""


class InsufficientSpaceError(PullError, OSError):
    """Not enough free disk space for a download."""


class GGUFError(JupyterLLMError, ValueError):
    """A file that is not a GGUF model, or whose header is corrupt."""


class TruncatedGGUFError(GGUFError):
    """A GGUF whose tensor data extends past the end of the file."""


class StoreError(JupyterLLMError, OSError):
    """The model store refused an operation."""


class ModelfileError(JupyterLLMError, ValueError):
    """A Modelfile that cannot be read, or a derived model that cannot be made from it.

    ``line`` is the Modelfile's line (1-based), 0 when the problem is not on one line.
    """

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


class ModelLoadError(JupyterLLMError):
    """A model could not be loaded."""


class WontFitError(ModelLoadError):
    """The memory estimate says the model will not fit; carries the estimate."""

    def __init__(self, message: str, estimate: object | None = None) -> None:
        super().__init__(message)
        self.estimate = estimate


class RpcServerError(ModelLoadError, ConnectionError):
    """An rpc-server (``--rpc HOST:PORT``) that cannot be used; ``endpoint`` names it."""

    def __init__(self, endpoint: str, message: str) -> None:
        super().__init__(message)
        self.endpoint = endpoint


class WorkerCrashedError(JupyterLLMError):
    """The worker process running llama.cpp died; the kernel is unaffected."""

    def __init__(self, message: str, signal: int | None = None, last_log: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal
        self.last_log = last_log


class ContextOverflowError(JupyterLLMError):
    """A prompt (or conversation) does not fit into the model's context window."""

    def __init__(self, message: str, n_tokens: int | None = None, n_ctx: int | None = None) -> None:
        super().__init__(message)
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx


class CapabilityError(JupyterLLMError, ValueError):
    """The model lacks what a request needs: ``capability`` names it as Ollama's ``/api/show``
    does (``insert`` for fill-in-the-middle, ``thinking`` for separated reasoning)."""

    def __init__(self, message: str, capability: str) -> None:
        super().__init__(message)
        self.capability = capability


class ServerError(JupyterLLMError):
    """The background HTTP API could not start or stop."""


class RemoteEngineError(JupyterLLMError, ConnectionError):
    """A remote engine (``%llm remote add``) could not be reached or answered an error.

    The message names the remote and its address, never its token; ``status`` is the HTTP
    status it answered, None when it could not be reached at all."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


__all__ = [
    "AliasFileError",
    "AmbiguousModelError",
    "CapabilityError",
    "ContextOverflowError",
    "GGUFError",
    "HostUnreachableError",
    "InsufficientSpaceError",
    "IntegrityError",
    "JupyterLLMError",
    "ModelLoadError",
    "ModelNotFoundError",
    "PullError",
    "RemoteEngineError",
    "RemoteError",
    "ServerError",
    "StoreError",
    "TruncatedGGUFError",
    "WontFitError",
    "WorkerCrashedError",
]

