"""CSV tables written atomically (temporary name, then renamed into place)."""

import csv
import io
import os
from pathlib import Path


def write_csv(path, rows: list[dict], fields, overwrite: bool = True) -> Path:
  """Writes ``rows`` (floats as ``%.6g``) to ``path``; refuses to replace unless asked."""
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path}: already exists (pass --overwrite to replace)')
  path.parent.mkdir(parents=True, exist_ok=True)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fields, extrasaction='ignore')
  w.writeheader()
  for r in rows:
    w.writerow({k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in r.items()})
  tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path
