"""CSV tables written atomically (``atomic_write``)."""

import csv
import io
from pathlib import Path

from wmh_jax import atomic_write


def cell(value):
  """A float as its shortest exact (round-trip) text, so that a metric read back
  from a table equals the computed one; anything else as it is."""
  return repr(float(value)) if isinstance(value, float) else value


def write_csv(path, rows: list[dict], fields, overwrite: bool = True) -> Path:
  """Writes ``rows`` (floats exactly, :func:`cell`) to ``path``; refuses to
  replace unless asked."""
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path}: already exists (pass --overwrite to replace)')
  buf = io.StringIO()
  w = csv.DictWriter(buf, fields, extrasaction='ignore')
  w.writeheader()
  for r in rows:
    w.writerow({k: cell(v) for k, v in r.items()})
  return atomic_write.write(path, buf.getvalue(), overwrite=overwrite)
