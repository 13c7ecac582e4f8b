"""Run records: atomic writes, JSON text, package versions and file hashes stored next to every output.

Every writer here is atomic: a file is written to a temporary sibling, fsynced, given the permissions a plain
``open`` would give it and moved into place with ``os.replace`` (:func:`atomic_open`); a directory is built in a
temporary sibling and renamed into place only when complete (:func:`atomic_directory`). Readers see the old output
or the complete new one, never half of it, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Optional, Union

__all__ = [
    "PACKAGES",
    "atomic_directory",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_folder",
    "check_output_file",
    "dumps",
    "environment_record",
    "not_utf8_error",
    "package_version",
    "package_versions",
    "public_mode",
    "read_json",
    "read_text",
    "sha256_file",
    "staged_directory",
]

PathLike = Union[str, os.PathLike]

PACKAGES = ("cuma", "torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy")


# ---------------------------------------------------------------------------------------------------------- files


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_mode(path: PathLike, is_dir: bool = False) -> None:
    """Give a file made by ``mkstemp`` / ``mkdtemp`` (0600 / 0700) the permissions a plain ``open`` would."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing (``"wb"``, or ``"w"``: UTF-8, ``\\n`` kept as is); when the
    block succeeds it is fsynced, given public modes and ``os.replace``-d into place; on failure it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a new file: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (:func:`atomic_open`); returns the path as given, as a string."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def atomic_write_text(path: PathLike, text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path as given, as a string."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(value: Any) -> Any:
    # numpy / torch scalars and arrays, without importing either here
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON: {value!r}")


def dumps(value: Any, indent: Optional[int] = None) -> str:
    """JSON text as written everywhere here: UTF-8 kept, NaN refused, numpy values converted."""
    return json.dumps(value, ensure_ascii=False, indent=indent, default=_json_default, allow_nan=False)


def atomic_write_json(path: PathLike, value: Any, indent: int = 2) -> str:
    """:func:`atomic_write_text` of ``value`` as :func:`dumps` JSON plus a final newline; returns the path."""
    return atomic_write_text(path, dumps(value, indent=indent) + "\n")


@contextlib.contextmanager
def atomic_directory(target: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to ``target`` when the block succeeds.

    An existing non-empty ``target`` is an error unless ``overwrite``; then it is moved aside, the new directory is
    renamed into place, and the old one is deleted. On failure the temporary directory is removed and ``target`` is
    left untouched.
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output path {str(target)!r} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"output directory {str(target)!r} exists and is not empty; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    public_mode(tmp, is_dir=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Optional[Path] = None
    if target.exists():
        if any(target.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.rmdir(old)
            os.replace(target, old)
        else:
            os.rmdir(target)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: PathLike, last: Iterable[str] = ()) -> Iterator[Path]:
    """Write a command's outputs into a temporary sibling of ``target``, moved into ``target`` when the block succeeds.

    Unlike :func:`atomic_directory` an existing ``target`` is kept with whatever else it holds (a training run's
    checkpoints and logs): a new or empty ``target`` is the temporary folder renamed into place; otherwise each
    staged entry replaces its namesake, and the names in ``last`` (the file that marks the output complete) are
    removed from ``target`` first and moved in last. On failure the temporary folder is removed and ``target`` is
    left as it was, so a failed command never leaves half of its outputs behind.
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise ValueError(f"output path {str(target)!r} exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        public_mode(tmp, is_dir=True)
        yield tmp
        if not target.exists() or not any(target.iterdir()):
            try:  # another process (a second rank saving the same output) may fill target meanwhile
                if target.exists():
                    target.rmdir()
                os.replace(tmp, target)
                return
            except OSError:
                if not target.is_dir():
                    raise
        last = set(last)
        for name in last:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target / name)
        for entry in sorted(tmp.iterdir(), key=lambda p: p.name in last):
            dest = target / entry.name
            if entry.is_dir() and dest.is_dir():
                shutil.rmtree(dest)
            elif dest.is_dir():
                raise ValueError(f"cannot write {dest}: a folder of that name is in the way")
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------- output checks


_PROBE = ".cuma-write-check."


def _describe_os_error(err: OSError) -> str:
    return err.strerror or type(err).__name__


def check_output_dir(path: PathLike, option: str = "output") -> Path:
    """Check, before any work starts, that the folder ``path`` can be created (or exists) and written, and leave
    nothing behind: the missing folders are made, a probe file is written and removed, and the folders made are
    removed again (kept under a multi-process launch, where every rank checks). A file in the way, a read-only folder
    or any other OS error is a ValueError naming ``option`` and the path. Returns the path."""
    target = Path(path).expanduser()
    option_text = f"{option}={os.fspath(path)!r}"
    # the nearest existing ancestor must be a folder; the first file on the way is named
    missing: list[Path] = []
    probe = target
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = ("exists and is not a directory" if probe == target
                 else f"cannot be made: {probe} is a file, not a directory")
        raise ValueError(f"{option_text}: {where}")
    made: list[Path] = []
    # under a multi-process launch every rank checks at once: folders are then made idempotently and kept (the run
    # writes there anyway), so one rank never removes a folder another is probing
    shared = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    try:
        for d in reversed(missing):
            d.mkdir(exist_ok=shared)
            if not shared:
                made.append(d)
        fd, tmp = tempfile.mkstemp(prefix=_PROBE, dir=target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        failed = Path(err.filename) if getattr(err, "filename", None) else target
        raise ValueError(f"{option_text}: cannot write there ({_describe_os_error(err)}: {failed})") from None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
    return target


def check_output_folder(path: PathLike, option: str = "--out", overwrite: Optional[bool] = None) -> Path:
    """A command's output folder, checked before it starts work: :func:`check_output_dir`, and with ``overwrite``
    False (a command that has an ``--overwrite`` flag, not given) a folder that exists and is not empty is an error
    rather than having its files replaced one by one at the end."""
    target = check_output_dir(path, option)
    # another rank's probe file (a multi-process launch checks on every rank at once) does not make it non-empty
    if overwrite is False and target.is_dir() and any(not p.name.startswith(_PROBE) for p in target.iterdir()):
        raise ValueError(f"{option} {os.fspath(path)}: the folder exists and is not empty; pass --overwrite to replace "
                         "its files, or choose another folder")
    return target


def check_output_file(path: PathLike, option: str = "output") -> Path:
    """:func:`check_output_dir` for the folder of the file ``path``; a folder at ``path`` itself is an error."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"{option}={os.fspath(path)!r}: is a folder, expected a file path")
    check_output_dir(target.parent if str(target.parent) else Path("."), option=f"{option} (its folder)")
    return target


# ---------------------------------------------------------------------------------------------------------- reading


def not_utf8_error(path: PathLike, err: Optional[UnicodeDecodeError] = None) -> ValueError:
    """The error every reader raises for a file that is not UTF-8: the file, the first bad byte and its line and
    column (found by decoding the file again: a decoder's own offset may be relative to a buffer)."""
    detail = ""
    try:
        data = Path(path).read_bytes()
        data.decode("utf-8")
    except UnicodeDecodeError as found:
        start = found.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        detail = f" (byte 0x{data[start:start + 1].hex()} at line {line}, column {column})"
    except OSError:
        pass
    return ValueError(f"{os.fspath(path)}: not UTF-8 text{detail}; save the file as UTF-8")


def read_text(path: PathLike) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 is a ValueError naming it (:func:`not_utf8_error`)."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None


def read_json(path: PathLike, expect: Optional[type] = dict, what: str = "") -> Any:
    """Parse the JSON file ``path``. Not UTF-8, not valid JSON, or (with ``expect``) not of that type: a ValueError
    naming the file, the place and what was expected (``what`` says what the file is, e.g. "the method record")."""
    text = read_text(path)
    label = f"{os.fspath(path)}" + (f" ({what})" if what else "")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{label}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "a JSON object", list: "a JSON array"}.get(expect, expect.__name__)
        raise ValueError(f"{label}: expected {kind}, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------------------- versions


def package_version(name: str) -> Optional[str]:
    """The installed version of the distribution ``name``; ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: Iterable[str] = PACKAGES, *, python: bool = False) -> dict[str, Optional[str]]:
    """``{name: version}`` for the distributions ``names`` (``None`` when not installed); with ``python=True`` the
    Python version comes first under ``"python"``."""
    out: dict[str, Optional[str]] = {"python": platform.python_version()} if python else {}
    for name in names:
        out[name] = package_version(name)
    return out


def environment_record() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": package_versions()}
