"""CSV tables written atomically (temporary name, then renamed into place)."""

import csv
import io
import os
from pathlib import Path


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
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fields, extrasaction='ignore')
  w.writeheader()
  for r in rows:
    w.writerow({k: cell(v) for k, v in r.items()})
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
