"""`ctrace doctor --collect FILE`: save this machine's inputs as a tar.gz bundle.

The bundle is written by the same code path that analyses a live machine: every
input that path reads is copied into the bundle as it is read, in the same order,
with the same fallbacks. So `--root FILE` elsewhere sees what doctor saw here.
The file is created 0600 with O_EXCL|O_NOFOLLOW: an existing file or a planted
symbolic link is refused, never overwritten; temporary data lives in unnamed files.
"""

import io
import json
import os
import tarfile
import tempfile
import time
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

from ctrace import __version__
from ctrace.doctor import inputs as P
from ctrace.doctor.inputs import LiveInputs
from ctrace.doctor.snapshot import Snapshot, load
from ctrace.files import create_private
from ctrace.status import CtraceError, ExitStatus


class _Tee:
    """A file being read whose bytes are also kept, handed on when it is closed."""

    def __init__(self, f: IO[bytes], done: Callable[[IO[bytes]], None]) -> None:
        self._f = f
        self._spool = tempfile.TemporaryFile()
        self._done = done
        self._closed = False

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._spool.write(data)
        return data

    def __iter__(self) -> Iterator[bytes]:
        for line in self._f:
            self._spool.write(line)
            yield line

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._f.close()
        finally:
            self._done(self._spool)

    def __enter__(self) -> "_Tee":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _slab_filter(data: bytes) -> bytes:
    """Keep only the header and the nf_conntrack caches of /proc/slabinfo."""
    keep = [line for line in data.splitlines(True) if line.startswith((b"slabinfo", b"#", b"nf_conntrack"))]
    return b"".join(keep)


class CollectingInputs(LiveInputs):
    """Live inputs that copy every file they serve into an open tar archive."""

    def __init__(self, tar: tarfile.TarFile, **kw: Any) -> None:
        super().__init__(**kw)
        self._tar = tar
        self.written: List[str] = []

    def _add(self, rel: str, spool: IO[bytes]) -> None:
        try:
            if rel == P.SLABINFO:
                spool.seek(0)
                data = _slab_filter(spool.read())
                spool = io.BytesIO(data)  # type: ignore[assignment]
            size = spool.seek(0, os.SEEK_END)
            spool.seek(0)
            info = tarfile.TarInfo(rel)
            info.size = size
            info.mode = 0o600
            info.mtime = int(time.time())
            self._tar.addfile(info, spool)
            self.written.append(rel)
        finally:
            spool.close()

    def _open(self, rel: str) -> IO[bytes]:
        f = super()._open(rel)
        return _Tee(f, lambda spool: self._add(rel, spool))  # type: ignore[return-value]


def collect(path: str, run: Optional[Callable[..., Any]] = None, root: str = "/",
            interval: float = 0.0) -> Tuple[Snapshot, List[str], Dict[str, str]]:
    """Write the bundle; returns the snapshot read while writing, the paths saved and
    the inputs that could not be read (path -> reason)."""
    fd = create_private(path)
    ok = False
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                inp = CollectingInputs(tar, run=run, root=root, interval=interval)
                snap = load(inp)
                meta = dict(inp.meta)
                t0 = min((v[0] for v in inp.timing.values()), default=0.0)
                meta.update({
                    "ctrace_version": __version__,
                    "missing": dict(snap.missing),
                    "timing": {k: [round(v[0] - t0, 6), round(v[1] - t0, 6)] for k, v in inp.timing.items()},
                    "files": list(inp.written),
                })
                data = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
                info = tarfile.TarInfo(P.META)
                info.size = len(data)
                info.mode = 0o600
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
        ok = True
    except OSError as exc:
        raise CtraceError(f"cannot write {path}: {exc.strerror or exc}", ExitStatus.CANNOT_WRITE) from None
    finally:
        if not ok:
            try:
                os.unlink(path)
            except OSError:
                pass
    return snap, inp.written, dict(snap.missing)
