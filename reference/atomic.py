"""Atomic output: a file or a folder is either the complete old one or the complete new one.

Every writer that produces a user-facing file (checkpoints, golden dumps, reports, plots)
goes through here, so "a write killed half-way leaves a half-written file" has one fix.

Files: written beside the target as ``.NAME.tmp-PID-TOKEN<suffix>`` (same folder, so the
rename stays on one filesystem), flushed and fsynced, then ``os.replace``d over the target.
The original suffix is kept at the end of the temp name because some writers infer the
format from it (``savefig``, ``np.save`` appends ``.npy`` otherwise).

Folders (a checkpoint is several files that must match: config.json and its shards):
  1. everything is written into ``.NAME.tmp-PID-TOKEN`` beside ``NAME``;
  2. it is renamed to ``.NAME.new-PID-TOKEN``: a rename is atomic, so a ``.new`` folder is
     complete by construction (no marker file ends up inside the checkpoint);
  3. ``NAME`` -> ``.NAME.old-PID-TOKEN``, then ``.new`` -> ``NAME``, then the old one is deleted.
A reader that finds ``NAME`` missing calls ``recover_dir``: between the two renames of step 3
the new folder is complete and its writer is gone, so finishing the rename is what the writer
would have done (see ``recover_dir``). Leftovers of writers that no longer run are removed
at the start of the next write of the same target.

Durability: files and folders are fsynced before the rename that publishes them, and the
parent folder after it, so a power cut (not only a SIGKILL) also leaves old-or-new.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import IO, Callable, Iterator


class AtomicWriteError(OSError):
    """A target we cannot replace atomically (mount point, working directory); names the path."""


def _leftover_re(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(tmp|new|old)-(\d+)-([0-9a-f]+)")


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a leftover of a live writer is not ours)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def leftovers(path: str | Path) -> list[tuple[Path, str, int, str]]:
    """(path, stage 'tmp'|'new'|'old', writer pid, token) of every write leftover beside ``path``."""
    p = Path(path)
    pat, out = _leftover_re(p.name), []
    try:
        entries = list(p.parent.iterdir())
    except OSError:  # no such folder (or not a folder): nothing was left there
        return []
    for e in entries:
        m = pat.match(e.name)
        if m:
            out.append((e, m.group(1), int(m.group(2)), m.group(3)))
    return sorted(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_leftovers(path: str | Path) -> list[Path]:
    """Delete leftovers of writers of ``path`` that no longer run; returns what was removed.
    A missing folder target with a complete ``.new`` is recovered first (it may be the only
    complete copy)."""
    p = Path(path)
    if not p.exists():
        recover_dir(p, wait_s=0.0)
    gone = []
    for e, _, pid, _ in leftovers(p):
        if not _alive(pid):
            _remove(e)
            gone.append(e)
    return gone


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a folder; the rename is still atomic
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _temp_name(p: Path, stage: str, token: str, keep_suffix: bool) -> Path:
    return p.parent / f".{p.name}.{stage}-{os.getpid()}-{token}{p.suffix if keep_suffix else ''}"


# ------------------------------------------------------------------ files
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that takes a file name (safetensors save_file,
    savefig, np.save, tokenizer.save); on normal exit it is fsynced and renamed onto ``path``,
    on an exception deleted."""
    p = Path(path)  # its folder must exist (as for open(path, "w")): a missing one is the caller's error
    clean_leftovers(p)
    tmp = _temp_name(p, "tmp", secrets.token_hex(4), keep_suffix=True)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(errno.ENOENT, "the writer did not create its output", str(tmp))
        _fsync_path(tmp)
        os.replace(tmp, p)
        _fsync_path(p.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kw) -> Iterator[IO]:
    """``open`` for writing, atomically: the file appears at ``path`` only when the block ends."""
    if not mode.startswith("w"):
        raise ValueError(f"atomic_open: mode must be a write mode ('w', 'wb'), got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


# ------------------------------------------------------------------ folders
def _check_dir_target(p: Path) -> None:
    if p.exists() and not p.is_dir():
        raise AtomicWriteError(errno.EEXIST, "exists and is not a directory", str(p))
    if p.is_dir() and os.path.ismount(p):
        raise AtomicWriteError(errno.EBUSY, "is a mount point; a folder is replaced by renaming it, so "
                               "write into a subfolder of it", str(p))
    cwd = Path.cwd().resolve()
    if p.exists() and (cwd == p or p in cwd.parents):
        raise AtomicWriteError(errno.EBUSY, "holds the current working directory; a folder is replaced by "
                               "renaming it, so write to another path or change directory", str(p))


def _carry(src: Path, dst: Path) -> None:
    """Hard-link (else copy) ``src`` into the new folder: no data is copied on one filesystem,
    and the old folder keeps its own link until it is deleted."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(src, dst)


@contextlib.contextmanager
def atomic_dir(path: str | Path, carry: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """A fresh temp folder beside ``path``; on normal exit it replaces ``path`` (see module doc).

    carry(name): entries of an existing ``path`` to bring into the new folder (files the
    writer does not produce, e.g. a tokenizer.json beside a checkpoint's weights); they are
    hard-linked in after the writer's block, never overwriting what the writer wrote.
    The new folder gets the old folder's permissions (else the umask's default).
    """
    p = Path(os.path.realpath(path))  # a symlinked target: replace the folder it points to
    p.parent.mkdir(parents=True, exist_ok=True)
    _check_dir_target(p)
    clean_leftovers(p)
    token = secrets.token_hex(4)
    tmp, new, old = (_temp_name(p, s, token, keep_suffix=False) for s in ("tmp", "new", "old"))
    os.mkdir(tmp)
    try:
        yield tmp
        if p.is_dir() and carry is not None:
            for e in sorted(p.iterdir()):
                if carry(e.name) and not (tmp / e.name).exists() and not (tmp / e.name).is_symlink():
                    _carry(e, tmp / e.name)
        if p.is_dir():
            os.chmod(tmp, p.stat().st_mode & 0o7777)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                _fsync_path(f)
        _fsync_path(tmp)
        os.rename(tmp, new)  # complete from here on
        _fsync_path(p.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        if p.exists():
            os.rename(p, old)
        os.rename(new, p)
        _fsync_path(p.parent)
    except BaseException:
        # put the old folder back if the new one could not be moved in (a Python exception,
        # not a kill: a kill here is what recover_dir handles)
        if not p.exists() and old.exists():
            os.rename(old, p)
        shutil.rmtree(new, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: str | Path, wait_s: float = 5.0) -> str | None:
    """For a folder target that does not exist: finish an interrupted ``atomic_dir`` swap.

    Returns None when ``path`` exists afterwards, else a sentence for the error message that
    says what lies beside it and what to do. Automatic only when unambiguous: exactly one
    complete ``.new`` folder whose writer no longer runs. A writer that still runs is inside
    its two renames (microseconds), so we wait up to ``wait_s`` for it instead of racing it.
    Renaming in a reader is safe: it is the rename the writer would have made, a concurrent
    second reader's rename then fails and finds ``path`` present, and nothing is deleted
    except the ``.old`` folder of that same write, which the writer would also have deleted.
    """
    p = Path(os.path.realpath(path))
    deadline = time.monotonic() + wait_s
    while True:
        if p.exists():
            return None
        found = leftovers(p)
        new = [(e, pid, tok) for e, stage, pid, tok in found if stage == "new" and e.is_dir()]
        live = [e for e, pid, tok in new if _alive(pid)]
        if live and time.monotonic() < deadline:
            time.sleep(0.02)
            continue
        dead = [(e, tok) for e, pid, tok in new if not _alive(pid)]
        if len(dead) == 1 and not live:
            e, tok = dead[0]
            try:
                os.rename(e, p)
            except FileNotFoundError:  # another reader finished it first
                pass
            except OSError as err:
                return (f"an interrupted write left the complete new copy {e.name} beside it but it could not "
                        f"be renamed ({err.strerror}); run: mv '{e}' '{p}'")
            for o, stage, _, t in leftovers(p):
                if stage == "old" and t == tok:
                    _remove(o)
            if p.exists():
                return None
            continue
        if len(new) > 1:
            names = ", ".join(e.name for e, _, _ in new)
            return f"several complete copies from interrupted writes lie beside it ({names}); rename the one to keep to {p.name}"
        if live:
            return f"a write in progress (pid {new[0][1]}) has not finished replacing it; try again when it ends"
        olds = [e for e, stage, _, _ in found if stage == "old" and e.is_dir()]
        if olds:
            return (f"the previous copy of an interrupted write lies beside it ({olds[-1].name}); to use it, "
                    f"run: mv '{olds[-1]}' '{p}'")
        tmps = [e for e, stage, _, _ in found if stage == "tmp"]
        if tmps:
            return f"an interrupted write left only an incomplete copy ({tmps[-1].name}); delete it and write again"
        return None if p.exists() else ""
