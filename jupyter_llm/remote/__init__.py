"""Remote engines: models served by another machine's Ollama, llama-server, vLLM or LM Studio.

``registry`` (add, list, remove, persist, poll what each remote reports), ``client`` (HTTP,
errors that name the address and never the token, the streamed answer), ``openai_engine`` and
``ollama_engine`` (the two protocols), ``model`` (a remote model shaped like a loaded one, so
a chat turn goes through :func:`jupyter_llm.chat.start` either way).
"""

from .model import RemoteModel
from .registry import Remote, Remotes

__all__ = ["Remote", "RemoteModel", "Remotes"]
