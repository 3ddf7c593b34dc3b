"""Random-access document sources (Grain `RandomAccessDataSource`s: `__len__` + `__getitem__`).

Text sources scan their input once when built: malformed records fail with `file:line` (or are
skipped and counted with `skip_malformed`), and empty or non-UTF-8 documents are counted in
`.stats` and left out, so the pipeline only ever sees good records and can report what it dropped.
"""

import collections
import json
import os

from jaxtele.errors import JaxteleError, read_json

TEXT_SUFFIXES = (".md", ".txt")


class Records:
  """A source held in memory as records ({id, text} or selected fields); `stats` counts what was left out and why."""

  def __init__(self):
    self.records: list = []
    self.stats = collections.Counter()

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]

  def _add_text(self, doc_id, raw: bytes):
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError:
      self.stats["dropped_non_utf8"] += 1
      return
    if not text.strip():
      self.stats["dropped_empty"] += 1
      return
    self.records.append({"id": doc_id, "text": text})


class Text(Records):
  """A text file is one document; a folder gives one document per `.md`/`.txt` file (sorted, recursive)."""

  def __init__(self, path: str):
    super().__init__()
    if os.path.isfile(path):
      with open(path, "rb") as f:
        self._add_text(os.path.basename(path), f.read())
      return
    if not os.path.isdir(path):
      raise JaxteleError(f"{path}: no such file or folder (text source)")
    for root, _, files in sorted(os.walk(path)):
      for name in sorted(files):
        if name.endswith(TEXT_SUFFIXES):
          with open(os.path.join(root, name), "rb") as f:
            self._add_text(os.path.relpath(os.path.join(root, name), path), f.read())


class Jsonl(Records):
  """One JSON object per line; `field` holds the text, or `fields` selects several (SFT records)."""

  def __init__(self, path: str, field: str | None = "text", fields=None, skip_malformed=False, id_field=None):
    super().__init__()
    if not os.path.isfile(path):
      raise JaxteleError(f"{path}: no such file (jsonl source)")
    with open(path, "rb") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{lineno}"
        try:
          obj = json.loads(line)
          if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
          if skip_malformed:
            self.stats["skipped_malformed"] += 1
            continue
          raise JaxteleError(f"{where}: malformed JSON line ({str(e).splitlines()[0]})") from None
        doc_id = str(obj.get(id_field, lineno)) if id_field else f"{os.path.basename(path)}:{lineno}"
        self._add_object(obj, doc_id, where, field, fields)

  def _add_object(self, obj, doc_id, where, field, fields):
    if fields:
      missing = [k for k in fields if k not in obj]
      if missing:
        raise JaxteleError(f"{where}: missing field {missing[0]!r}")
      self.records.append({"id": doc_id, **{k: obj[k] for k in fields}})
      return
    if field not in obj:
      raise JaxteleError(f"{where}: missing field {field!r}")
    if not isinstance(obj[field], str):
      raise JaxteleError(f"{where}: field {field!r} is not a string")
    self._add_text(doc_id, obj[field].encode("utf-8", "surrogatepass"))


class JsonList(Jsonl):
  """A JSON file holding a list of objects (e.g. Alpaca); errors name the file and the JSON line."""

  def __init__(self, path: str, field: str | None = "text", fields=None, id_field=None):
    Records.__init__(self)
    items = read_json(path, "no such file (json source)")
    if not isinstance(items, list):
      raise JaxteleError(f"{path}: expected a JSON list of objects")
    for i, obj in enumerate(items):
      if not isinstance(obj, dict):
        raise JaxteleError(f"{path}: item {i} is not a JSON object")
      doc_id = str(obj.get(id_field, i)) if id_field else f"{os.path.basename(path)}:{i}"
      self._add_object(obj, doc_id, f"{path}: item {i}", field, fields)


class Parquet(Records):
  def __init__(self, path: str, field: str = "text", fields=None):
    super().__init__()
    import pyarrow.parquet as pq

    if not os.path.isfile(path):
      raise JaxteleError(f"{path}: no such file (parquet source)")
    table = pq.read_table(path)
    cols = fields or [field]
    for c in cols:
      if c not in table.column_names:
        raise JaxteleError(f"{path}: no column {c!r} (columns: {', '.join(table.column_names)})")
    data = table.select(cols).to_pydict()
    for i in range(table.num_rows):
      doc_id = f"{os.path.basename(path)}:{i}"
      if fields:
        self.records.append({"id": doc_id, **{c: data[c][i] for c in cols}})
      elif data[field][i] is None:
        self.stats["dropped_empty"] += 1
      else:
        self._add_text(doc_id, data[field][i].encode("utf-8", "surrogatepass"))


class Tfds:
  """A TFDS ArrayRecord dataset read without TensorFlow: by name (`tfds.data_source`) or by directory.

  Records are decoded to plain Python: bytes -> str, arrays stay numpy.
  """

  def __init__(self, path: str | None = None, name: str | None = None, split: str = "train", data_dir=None):
    import tensorflow_datasets as tfds

    try:
      if path:
        self.source = tfds.builder_from_directory(path).as_data_source(split=split)
      else:
        self.source = tfds.data_source(name, split=split, data_dir=data_dir)
    except Exception as e:
      raise JaxteleError(f"{path or name}: cannot open TFDS dataset split {split!r} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    self.stats = collections.Counter()

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    rec = self.source[i]
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in rec.items()}


SOURCES = {"text": Text, "jsonl": Jsonl, "json": JsonList, "parquet": Parquet, "tfds": Tfds}
SOURCE_KEYS = {"type", "weight", "path", "name", "split", "data_dir", "field", "fields", "skip_malformed", "id_field"}


def make_source(spec: dict, where: str = "data.sources"):
  """Build a source from a config dict such as `{type: jsonl, path: ..., field: text}`."""
  spec = dict(spec)
  kind = spec.pop("type", None)
  if kind not in SOURCES:
    raise JaxteleError(f"{where}.type: unknown source type {kind!r} (choose from {', '.join(SOURCES)})")
  unknown = set(spec) - SOURCE_KEYS
  if unknown:
    raise JaxteleError(f"{where}: unknown key {sorted(unknown)[0]!r} for a {kind} source")
  spec.pop("weight", None)
  import inspect

  accepted = inspect.signature(SOURCES[kind]).parameters
  bad = [k for k in spec if k not in accepted]
  if bad:
    raise JaxteleError(f"{where}: key {bad[0]!r} does not apply to a {kind} source")
  return SOURCES[kind](**spec)
