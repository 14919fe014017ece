"""CSV tables written atomically (``atomic_write``)."""

import csv
import io
from pathlib import Path

from wmh_jax import atomic_write


def write_csv(path, rows: list[dict], fields, overwrite: bool = True) -> Path:
  """Writes ``rows`` (floats as ``%.6g``) to ``path``; refuses to replace unless asked."""
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path}: already exists (pass --overwrite to replace)')
  buf = io.StringIO()
  w = csv.DictWriter(buf, fields, extrasaction='ignore')
  w.writeheader()
  for r in rows:
    w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})
  return atomic_write.write(path, buf.getvalue(), overwrite=overwrite)
