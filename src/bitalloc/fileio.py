"""Safe file output: nothing half-written, nothing of the user's destroyed.

- Every file and folder is first written under a temporary name next to its
  target, ``.NAME.bitalloc-tmp-PID-RANDOM``, then renamed onto it; a folder
  that replaces an earlier bitalloc output is swapped in by one atomic
  exchange (``renameat2(RENAME_EXCHANGE)``; two renames where the kernel
  lacks it). Temporaries are removed on every exit path Python controls; those
  of a killed run (their PID is gone) are cleaned by the next write to the
  same target.
- Files and folders honour the umask (``mkstemp``/``mkdtemp`` would give
  0600/0700).
- ``check_output`` refuses, before any work, an output path that exists and is
  not a bitalloc output of the same kind, unless the user said ``--overwrite``.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

from bitalloc.errors import BitallocError

TMP_TAG = ".bitalloc-tmp-"
OLD_TAG = ".bitalloc-old-"
_RENAME_EXCHANGE = 2  # linux/fs.h


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_name(path: Path, tag: str = TMP_TAG) -> Path:
    return path.with_name(f".{path.name}{tag}{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with _suppress_missing():
            path.unlink()


class _suppress_missing:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, FileNotFoundError)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Leftovers of killed bitalloc runs that wrote ``path`` (their PID is gone)."""
    path = Path(path)
    out = []
    if not path.parent.is_dir():
        return out
    for tag in (TMP_TAG, OLD_TAG):
        for p in path.parent.glob(f".{path.name}{tag}*"):
            pid = p.name[len(f".{path.name}{tag}"):].split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                out.append(p)
    return sorted(out)


def clean_stale(path: str | os.PathLike) -> list[str]:
    """Remove a killed run's temporaries next to ``path``. If the run died
    between the two renames of a non-atomic swap (``path`` gone, its old copy
    kept), the old copy is put back first. Returns what was done, for a notice."""
    path = Path(path)
    done = []
    for p in stale_temporaries(path):
        if OLD_TAG in p.name and not path.exists() and not path.is_symlink():
            os.replace(p, path)
            done.append(f"restored {path} from an interrupted earlier run")
        else:
            _remove(p)
            done.append(f"removed {p.name}, left by an interrupted earlier run")
    return done


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, then rename onto ``path``; no half file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0666 & ~umask
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # a writer that recreated the file keeps the umask too
        os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        _raise_write_failure(e, path)
    return path


_IO_FAILURE = ("IoError", "Os {", "No space left", "Input/output error", "Read-only file system", "Disk quota")


def _raise_write_failure(e: BaseException, path: Path) -> None:
    """Re-raise a failed write so that the CLI's one line names the path:
    an OSError gets the path if it lacks one; a library's own error type
    (safetensors reports a full disk as ``SafetensorError: IoError(...)``)
    that wraps an I/O failure becomes an OSError or a BitallocError."""
    if isinstance(e, OSError):
        if e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise e
    text = str(e)
    if isinstance(e, Exception) and not isinstance(e, BitallocError) and any(k in text for k in _IO_FAILURE):
        if "No space left" in text or "StorageFull" in text:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise BitallocError(f"{str(path)!r} could not be written: {' '.join(text.split())[:300]}") from None
    raise e


def dumps_json(data: Any) -> str:
    """JSON text as bitalloc writes it: same data, same bytes."""
    return json.dumps(data, indent=1, allow_nan=True) + "\n"


def write_json(path: str | os.PathLike, data: Any) -> Path:
    text = dumps_json(data)
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing, unreadable or invalid file is one clear error."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise BitallocError(f"The {what} {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise BitallocError(f"The {what} {str(path)!r} is a folder, not a file.") from None
    except OSError as e:
        raise BitallocError(f"The {what} {str(path)!r} cannot be read: {e.strerror}.") from None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise BitallocError(f"The {what} {str(path)!r} holds the key {e.args[0]!r} twice in one object; which one "
                            "counts would be a guess. Keep one.") from None
    except RecursionError:
        raise BitallocError(f"The {what} {str(path)!r} is nested too deeply to be a bitalloc file.") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise BitallocError(f"The {what} {str(path)!r} is not valid JSON ({e}).") from None


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _honour_umask(folder: Path) -> None:
    """Some writers (safetensors) create files 0600; give everything in the
    folder the modes a plain ``open``/``mkdir`` would under the umask."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def replace_dir_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder, then put it at ``path``: a plain rename
    when nothing is there, else an atomic exchange with the old folder (which
    is then deleted). Callers check with ``check_output`` first that ``path``
    is theirs to replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _temp_name(path)
    os.mkdir(tmp, 0o777)  # 0777 & ~umask
    try:
        fill(tmp)
        _honour_umask(tmp)
        if not path.exists() and not path.is_symlink():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            _remove(tmp)  # now holds the old output
        else:
            old = _temp_name(path, OLD_TAG)
            os.replace(path, old)  # a kill here leaves `old`; clean_stale puts it back
            os.replace(tmp, path)
            _remove(old)
    except BaseException as e:
        _remove(tmp)
        _raise_write_failure(e, path)
    return path


# ---- what a path holds, before anything is written -------------------------

def file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_format(path: Path) -> str | None:
    """The 'format' field of a small JSON file, or None when it is not one."""
    try:
        if path.stat().st_size > 512 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) and isinstance(data.get("format"), str) else None


def _writable_parent(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BitallocError(f"{flag} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BitallocError(f"{flag} {str(path)!r} cannot be written: no write permission in {str(parent)!r}. "
                            "Choose another path.")


def _refuse_link(path: Path, flag: str) -> None:
    if path.is_symlink():
        raise BitallocError(f"{flag} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); bitalloc writes by "
                            "renaming a finished file onto the path, which would replace the link and leave its "
                            "target as it was. Pass the target's own path, or another path.")


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_apart(outputs: list[tuple[str, str]], inputs: list[tuple[str, str]]) -> None:
    """No output of a command is, contains, or lies inside one of its inputs
    (``--overwrite`` or not: replacing a folder deletes what is in it), and
    no two outputs are the same path or one inside the other. Paths are
    compared after symbolic links are resolved."""
    outs = [(flag, _real(p)) for flag, p in outputs if p]
    ins = [(flag, _real(p)) for flag, p in inputs if p]
    for i, (flag, out) in enumerate(outs):
        for in_flag, src in ins:
            if out == src:
                raise BitallocError(f"{flag} {str(out)!r} is the input of {in_flag}; bitalloc never writes over what "
                                    "it reads, --overwrite or not. Choose another output path.")
            if src in out.parents:
                raise BitallocError(f"{flag} {str(out)!r} lies inside the input of {in_flag} ({str(src)!r}); bitalloc "
                                    "never writes into what it reads. Choose a path outside it.")
            if out in src.parents:
                raise BitallocError(f"{flag} {str(out)!r} contains the input of {in_flag} ({str(src)!r}), which "
                                    "writing the output would replace. Choose a path that does not hold it.")
        for other_flag, other in outs[i + 1:]:
            if out == other or out in other.parents or other in out.parents:
                raise BitallocError(f"{flag} and {other_flag} name the same place ({str(out)!r}, {str(other)!r}); "
                                    "each output needs a path of its own.")


def check_output_file(path: str | os.PathLike | None, fmt: str, *, flag: str, overwrite: bool) -> None:
    """Refuse a file output that would destroy something bitalloc did not make:
    an existing folder, or a file that is not a bitalloc ``fmt`` JSON file."""
    if not path:
        return
    path = Path(path)
    _refuse_link(path, flag)
    _writable_parent(path, flag)
    if path.is_dir():
        raise BitallocError(f"{flag} {str(path)!r} is a folder; give a file path.")
    if path.exists() and not overwrite and json_format(path) != fmt:
        kind = fmt.split(".", 1)[-1].replace("-", " ")
        raise BitallocError(f"{flag} {str(path)!r} already exists and was not written by bitalloc as a {kind}; "
                            "bitalloc will not replace it. Choose another path, or pass --overwrite to replace it.")


def check_output_dir(path: str | os.PathLike | None, marker: str, fmt: str, *, flag: str, overwrite: bool,
                     own: frozenset[str] = frozenset()) -> None:
    """Refuse a folder output that exists and is not a bitalloc output of the
    same kind: ``marker`` is a JSON file inside whose 'format' is ``fmt`` and
    the folder holds nothing but ``marker``, the files ``own`` and those the
    marker lists under 'files'. An empty folder is fine; a file is refused."""
    if not path:
        return
    path = Path(path)
    _refuse_link(path, flag)
    _writable_parent(path, flag)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if not path.is_dir():
        raise BitallocError(f"{flag} {str(path)!r} is an existing file; bitalloc writes a folder there and will not "
                            "replace the file. Choose another path, or pass --overwrite.")
    present = {p.name for p in path.iterdir()}
    if not present:
        return
    known = set(own) | {marker}
    if json_format(path / marker) == fmt:
        listed = json.loads((path / marker).read_text(encoding="utf-8")).get("files", {})
        known |= set(listed) if isinstance(listed, dict) else set()
    foreign = sorted(present - known) if json_format(path / marker) == fmt else sorted(present)
    if foreign:
        raise BitallocError(f"{flag} {str(path)!r} is a folder that holds files bitalloc did not write (e.g. "
                            f"{foreign[0]!r}); bitalloc will not delete them. Choose a new or empty folder, or pass "
                            "--overwrite.")
