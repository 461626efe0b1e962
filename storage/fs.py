"""fsspec helpers: every byte the project reads or writes goes through these, so a run can live on any fsspec URL."""
from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import fsspec
from fsspec import AbstractFileSystem


def filesystem(url: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem and the protocol-free path of ``url`` (a local path or any fsspec URL)."""
    return fsspec.core.url_to_fs(str(url))


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    return "://" not in str(url) or str(url).startswith("file://")


def join(url: str, *parts: str) -> str:
    """Join path components onto a URL with '/'."""
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.isdir(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def listdir(url: str) -> list[str]:
    """Base names of the entries of a directory."""
    fs, path = filesystem(url)
    return sorted(name.rstrip("/").rsplit("/", 1)[-1] for name in fs.ls(path, detail=False))


def find(url: str) -> list[str]:
    """Paths relative to the directory ``url`` of every file below it, sorted."""
    fs, path = filesystem(url)
    root = path.rstrip("/") + "/"
    return sorted(found.removeprefix(root) for found in fs.find(path) if found.startswith(root))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextmanager
def atomic_open(url: str, mode: str = "wb") -> Iterator[IO]:
    """Open ``url`` for writing through a temporary sibling that is renamed into place on success.

    A crash or exception leaves either the previous file or nothing, never a half-written one.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports 'wb' and 'w', not {mode!r}")
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_bytes(url: str, data: bytes) -> None:
    """Atomically write ``data`` to ``url``."""
    with atomic_open(url, "wb") as handle:
        handle.write(data)


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode("utf-8"))


def open_binary(url: str) -> IO[bytes]:
    """Read the whole file at ``url`` into an in-memory binary stream."""
    return io.BytesIO(read_bytes(url))
