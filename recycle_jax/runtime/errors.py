"""How a command fails: bad input is one `UserError`, and every failure (bad input, the
filesystem, a signal, a bug) reaches the user as one line `error: what (where); how to
fix` with an exit status, never as a traceback (unless --verbose asks for it)."""
from __future__ import annotations

import errno
import re
import signal


class UserError(Exception):
  """Bad input. The message says what is wrong, where, and how to fix it."""

  def __init__(self, what: str, where: str = "", fix: str = ""):
    parts = [what]
    if where:
      parts.append(f"({where})")
    msg = " ".join(parts)
    if fix:
      msg += f"; {fix}"
    self.message = msg  # gin appends "In call to configurable ..." lines to str(e)
    super().__init__(msg)


def check(cond: bool, what: str, where: str = "", fix: str = "") -> None:
  if not cond:
    raise UserError(what, where, fix)


EXIT_USAGE = 2  # bad input or an environment the command cannot use
EXIT_BUG = 1  # an unexpected exception: a defect of recycle_jax


# errno -> how to fix, for the CLI's one line on a filesystem failure.
OS_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EROFS: "write somewhere writable",
    errno.EACCES: "check the permissions, or write somewhere else",
    errno.EPERM: "check the permissions, or write somewhere else",
    errno.EXDEV: "write the output on the filesystem of its directory",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file: check the path",
    errno.EISDIR: "pass a file path, not a directory",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EMFILE: "raise the open-files limit (ulimit -n)",
}


def os_error(e: OSError) -> UserError:
  """An OSError as the one-line UserError: what, which file, how to fix."""
  what = e.strerror or type(e).__name__
  where = e.filename if e.filename is not None else ""
  if e.filename2 is not None:
    where = f"{where} -> {e.filename2}"
  return UserError(what, str(where), OS_FIXES.get(e.errno, "check the path and the disk"))


FS_FIXES = {"No space left on device": "free some space or write elsewhere",
            "Read-only file system": "write somewhere writable",
            "Permission denied": "check the permissions, or write somewhere else",
            "Disk quota exceeded": "free some space or write elsewhere"}
FS_MESSAGE = re.compile("|".join(FS_FIXES))
FS_FILE = re.compile(r'file "([^"]+)"')
GIN_REQUIRED = re.compile(r"Required bindings for `([\w.]+)` not provided in config: \[([^\]]*)\]")


def one_line(e: BaseException, command: str = "") -> tuple[str, int]:
  """(the `error:` line, the exit status) for any exception that ends a command."""
  if isinstance(e, UserError):
    return f"error: {e.message}", EXIT_USAGE
  if isinstance(e, KeyboardInterrupt):
    signum = getattr(e, "signum", signal.SIGINT)
    hint = ("the search state is saved after every generation: rerun with --resume to "
            "continue" if command == "search" else "nothing was written; rerun to finish")
    if getattr(e, "put_back", None):  # --overwrite: the old workdir is kept until the end
      hint = (f"the workdir's previous contents were put back unchanged ({e.put_back}; "
              "--overwrite replaces them only when the new search finishes): rerun with "
              "--overwrite to start it again")
    return (f"error: interrupted by {signal.Signals(signum).name} (recycle-jax {command}); "
            f"{hint}"), 128 + signum
  if isinstance(e, OSError) and e.errno is not None:
    return f"error: {os_error(e).message}", EXIT_USAGE
  if isinstance(e, MemoryError):
    return (f"error: out of memory (recycle-jax {command}); lower --memory_budget_mb, the "
            "population or max_examples, or use a larger machine"), EXIT_USAGE
  msg = " ".join(str(e).split())[:300]
  required = GIN_REQUIRED.search(msg)  # gin's own wording for an unbound gin.REQUIRED
  if required:
    name, params = required.group(1), required.group(2).replace("'", "")
    first = params.split(",")[0].strip()
    return (f"error: {name} needs a value for {params} (--gin_file/--gin_bindings); bind "
            f"it, e.g. --gin_bindings=\"{name}.{first} = ...\""), EXIT_USAGE
  fs = FS_MESSAGE.search(msg)  # libraries (tensorstore) report filesystem errors as text
  if fs:
    path = FS_FILE.search(msg)
    what = next(k for k in FS_FIXES if k in fs.group(0))
    return (f"error: {what} ({path.group(1) if path else f'recycle-jax {command}'}); "
            f"{FS_FIXES[what]}"), EXIT_USAGE
  return (f"error: unexpected {type(e).__name__}{': ' + msg if msg else ''} (recycle-jax "
          f"{command}); rerun with --verbose for the traceback, and report it"), EXIT_BUG
