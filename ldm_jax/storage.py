"""Where runs live: a local path or a remote URL (gs://bucket/run, s3://...), one type for
both: `etils.epath.Path`, which orbax and tfds use too. Every path a command reads or
writes goes through `path`, so that a remote workdir is never turned into a local folder
named 'gs:' (pathlib's `absolute()` would do that), and every file is written through the
path's own `open`.

Object stores have no append and no atomic rename: `LineLog` keeps an append-only text
log (metrics.jsonl) by rewriting it whole on a remote store, and `write_atomic` writes
a local file under a temporary name first but a remote object directly (an object
appears whole or not at all). Files that only a local reader can open (array_record
shards: their reader takes local paths) are read from a `local_mirror` of the remote
folder, filled by `copy_tree`. Single files for such readers and writers (safetensors'
`safe_open` and `save_file`, torch.load's zip reader, transformers' `save_pretrained`) go
through `local_copy` (a remote file copied into the mirror's folder for the duration of a
read) and `staged` (written locally, then renamed into place or uploaded).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator

from etils import epath

Path = epath.Path


def is_remote(p) -> bool:
    return "://" in str(p)


def path(p) -> epath.Path:
    """`p` as an epath.Path: a URL as it is, a local path absolute with ~ expanded."""
    text = str(p) if isinstance(p, epath.Path) else os.fspath(p)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def write_atomic(target, data: bytes | str) -> None:
    """Writes `data` to `target` so that a reader never sees part of it."""
    target = path(target)
    mode = "w" if isinstance(data, str) else "wb"
    if is_remote(target):
        with target.open(mode) as f:
            f.write(data)
        return
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    with tmp.open(mode) as f:
        f.write(data)
    os.replace(os.fspath(tmp), os.fspath(target))


def save_png(target, image) -> None:
    """A PIL image written as PNG at `target` (local or remote)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(target, buffer.getvalue())


class LineLog:
    """An append-only text log. Local: appended and flushed line by line. Remote: object
    stores cannot append, so the lines are kept and the object rewritten at each
    `write` (read once at the start, so that a resumed run keeps the lines before)."""

    def __init__(self, target):
        self.target = path(target)
        self.remote = is_remote(self.target)
        if self.remote:
            self.text = self.target.read_text() if self.target.exists() else ""
        else:
            self.file = self.target.open("a")  # noqa: SIM115 - closed in close()

    def write(self, line: str) -> None:
        if self.remote:
            self.text += line
            self.target.write_text(self.text)
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if not self.remote:
            self.file.close()


def save_npz(target, **arrays) -> None:
    """numpy arrays written as an .npz at `target` (local or remote)."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(target, buffer.getvalue())


def copy_file(src, dst) -> None:
    """One file copied from `src` to `dst` (either may be remote), streamed in chunks."""
    with path(src).open("rb") as fin, path(dst).open("wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


def copy_tree(src, dst) -> None:
    """Every file under `src` copied to the same place under `dst` (either may be remote),
    streamed in chunks."""
    src, dst = path(src), path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            copy_file(item, dst / item.name)


def local_mirror(remote) -> epath.Path:
    """The local folder that mirrors a remote one, for files only a local reader opens
    (array_record shards): $LDM_JAX_MIRROR_DIR (default ~/.cache/ldm_jax/mirror), then the
    URL's host and path (gs://bucket/a/b -> <mirror>/gs/bucket/a/b)."""
    base = os.environ.get("LDM_JAX_MIRROR_DIR") or os.path.join("~", ".cache", "ldm_jax", "mirror")
    base = os.path.expanduser(base)  # epath leaves "~" as a folder name
    scheme, rest = str(remote).split("://", 1)
    return path(os.path.join(base, scheme, rest.strip("/")))


def _scratch(remote) -> epath.Path:
    """A new local path in the mirror's folder of `remote`, beside where its mirror would
    be, with `remote`'s name (and so its suffix) after a unique prefix."""
    mirror = local_mirror(remote)
    mirror.parent.mkdir(parents=True, exist_ok=True)
    return mirror.parent / f".{uuid.uuid4().hex[:8]}.{mirror.name}"


def _remove(local: epath.Path) -> None:
    if local.is_dir():
        shutil.rmtree(os.fspath(local), ignore_errors=True)
    else:
        local.unlink(missing_ok=True)


@contextlib.contextmanager
def local_copy(source) -> Iterator[epath.Path]:
    """A local file with the bytes of the file `source`, for readers that take local paths
    only: `source` itself where it is local; a remote file is streamed into the mirror's
    folder (`local_mirror`) and the copy removed when the block ends."""
    source = path(source)
    if not is_remote(source):
        yield source
        return
    local = _scratch(source)
    try:
        copy_file(source, local)
        yield local
    finally:
        _remove(local)


@contextlib.contextmanager
def staged(target) -> Iterator[epath.Path]:
    """A local path (not yet existing) to write `target` at, a file or a folder of files,
    for writers that take local paths only. When the block ends without an error it is
    published: renamed into place where `target` is local (so `target` appears whole),
    uploaded where it is remote (from the mirror's folder, then removed). After an error
    nothing is published and the local files are removed."""
    target = path(target)
    if is_remote(target):
        local = _scratch(target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        local = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        yield local
        if not is_remote(target):
            os.replace(os.fspath(local), os.fspath(target))
        elif local.is_dir():
            copy_tree(local, target)
        else:
            copy_file(local, target)
    finally:
        _remove(local)
