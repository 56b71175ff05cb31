"""Warnings reach the user: nothing jupyter_llm runs beside the user's code swaps the warning filters.

``warnings.catch_warnings`` saves the process-wide filters on entry and puts them back on exit;
two threads doing that at once restore each other's state in the wrong order, and the kernel is
left with whatever the first one had set (e.g. "ignore everything"). In a kernel, the first pull
imports ``tqdm.auto`` (which uses catch_warnings) while the sidebar's push runs in a thread.
Here the two overlap in the worst order every time: an import hook holds each import open until
the other one is inside its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kernel import Kernel

pytestmark = pytest.mark.slow

GATE = """
import importlib.abc, importlib.machinery, sys, threading, warnings

main_thread = threading.main_thread()
background_inside, main_inside, background_done = threading.Event(), threading.Event(), threading.Event()


class Held(importlib.abc.Loader):
    # Waits before running the module. (Waiting in find_spec would hold Python's global import
    # lock and so serialise the two imports instead of overlapping them.)
    def __init__(self, loader, wait):
        self.loader, self.wait = loader, wait

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.wait()
        self.loader.exec_module(module)


def hold_background():
    background_inside.set()
    main_inside.wait(30)


def hold_main():
    main_inside.set()
    background_done.wait(30)


class Gate(importlib.abc.MetaPathFinder):
    # The background thread's import of pynvml waits until the main thread is inside its import
    # of tqdm.autonotebook, which waits until the background work has finished.
    def find_spec(self, name, path=None, target=None):
        in_main = threading.current_thread() is main_thread
        wait = {"pynvml": None if in_main else hold_background, "tqdm.autonotebook": hold_main}.get(name)
        spec = importlib.machinery.PathFinder.find_spec(name, path) if wait else None
        if spec is not None:
            spec.loader = Held(spec.loader, wait)
        return spec


def gate():
    for module in ("pynvml", "tqdm.auto", "tqdm.autonotebook"):
        sys.modules.pop(module, None)
    sys.meta_path.insert(0, Gate())


def in_background(work):
    def run():
        try:
            work()
        finally:
            background_done.set()
    threading.Thread(target=run, daemon=True).start()
    assert background_inside.wait(30), "the background work never got under way"


def ungate():
    main_inside.set()
    assert background_done.wait(30)
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, Gate)]
"""

USER_WARNING = "import warnings; warnings.warn('the user must see this warning')"


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel({"JUPYTER_LLM_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf")})
    k.ok("%load_ext jupyter_llm")
    k.ok(GATE)
    yield k
    k.close()


def stderr(run: object) -> str:
    return "".join(m["content"]["text"] for m in run.messages  # type: ignore[attr-defined]
                   if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")


def test_the_sidebar_push_during_a_pulls_tqdm_import_leaves_warnings_working(kernel: Kernel) -> None:
    # The push reads the devices (NVML) while the pull's progress bar imports tqdm.auto.
    run = kernel.ok("gate()\n"
                    "from jupyter_llm.notebook.comm import get_hub\n"
                    "in_background(get_hub().push)\n"
                    "import tqdm.auto\n"
                    "ungate()")
    assert "TqdmExperimentalWarning" not in stderr(run)
    assert "the user must see this warning" in stderr(kernel.ok(USER_WARNING))


def test_the_first_progress_bar_prints_no_tqdm_warning_whatever_other_threads_do(kernel: Kernel) -> None:
    # Another thread (any library's) holds catch_warnings while the first bar is made.
    run = kernel.ok("gate()\n"
                    "def other_library():\n"
                    "    with warnings.catch_warnings():\n"
                    "        warnings.simplefilter('ignore')\n"
                    "        hold_background()\n"
                    "in_background(other_library)\n"
                    "from jupyter_llm.progress import PullProgress, TqdmListener\n"
                    "bars = TqdmListener()\n"
                    "bars(PullProgress('m', 'downloading', 'm.gguf', None, 100, 10))\n"
                    "bars(PullProgress('m', 'success'))\n"
                    "ungate()")
    assert "TqdmExperimentalWarning" not in stderr(run)
    assert "the user must see this warning" in stderr(kernel.ok(USER_WARNING))
