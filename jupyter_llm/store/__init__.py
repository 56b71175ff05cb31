"""The store: names, pulls and the files they leave on disk.

``names`` parses a model reference (aliases from ``aliases.json``); ``pull`` resolves it to a
source (``sources/``: Hugging Face, Ollama registries and stores, Python packages, local files)
and records what arrived; ``download`` moves model bytes (resumable, verified, atomic) over
``http``; ``records`` keeps name → files, sha256 and source; ``gguf`` scans headers into
``gguf_info.GGUFInfo``.
"""
