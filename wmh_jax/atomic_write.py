"""Files written whole or not at all: the one way wmh_jax writes an output file.

``write(path, content)`` creates a private temporary file with a unique name
(``tempfile.mkstemp``: ``O_EXCL``, so a symbolic link placed at any name is never
followed) in ``path``'s folder, writes ``content`` into it (bytes, text, or a
function given the open binary file), flushes it to disk, gives it mode 0644
less the process umask (mkstemp's files are 0600: collaborators could not read
them) and renames it onto ``path`` with ``os.replace``. The rename replaces
whatever is at ``path`` (a symbolic link included: the link itself, never its
target), and nothing ever opens ``path`` for writing. Readers see the old file
or the new one, never a part; two processes writing one target both succeed and
the last rename wins. On any error the temporary file is removed and ``path``
is untouched.
"""

import os
from pathlib import Path
import tempfile
from typing import BinaryIO, Callable

FILE_MODE = 0o644


def umask() -> int:
  """The process umask, read without changing it when Linux tells it
  (``/proc/self/status``; setting it to read it would briefly change it for
  every thread)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _prefix(name: str) -> str:
  """A hidden temporary-name prefix from the target's name (``.NAME.``)."""
  return '.' + name[:200] + '.'  # the temporary name stays within NAME_MAX


def _link_new(tmp: str, path: Path) -> None:
  """Puts ``tmp`` at ``path`` only if nothing is there, in one step (``link``
  fails on an existing name, a link included), then drops the ``tmp`` name."""
  try:
    os.link(tmp, path, follow_symlinks=False)
  except FileExistsError:
    raise FileExistsError(f'{path}: already exists (pass --overwrite to '
                          'replace)') from None
  except OSError:  # a file system without hard links: check, then rename
    if path.exists() or path.is_symlink():
      raise FileExistsError(f'{path}: already exists (pass --overwrite to '
                            'replace)') from None
    os.replace(tmp, path)
    return
  os.unlink(tmp)


def write(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], None],
          overwrite: bool = True, durable: bool = True) -> Path:
  """Writes ``content`` to ``path`` atomically (see the module docstring).

  Args:
    path: the target; its folder is created when missing.
    content: bytes, text (UTF-8), or a function writing into the binary file
      object it is given (``fig.savefig(f, format='png')``, ``np.savez(f, ...)``).
    overwrite: replace an existing ``path``; else ``FileExistsError``, also when
      another process creates ``path`` while this one writes.
    durable: ``fsync`` the file before the rename (a crash leaves the old file
      or the new one, not an empty one).

  Returns:
    ``path`` as a ``Path``.
  """
  path = Path(path)
  if not overwrite and (path.exists() or path.is_symlink()):
    raise FileExistsError(f'{path}: already exists (pass --overwrite to replace)')
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      if callable(content):
        content(f)
      else:
        f.write(content.encode() if isinstance(content, str) else content)
      f.flush()
      if durable:
        os.fsync(f.fileno())
      os.fchmod(f.fileno(), FILE_MODE & ~umask())
    if overwrite:
      os.replace(tmp, path)
    else:
      _link_new(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise
  return path
