"""Field, path and file checks shared by the readers (``tbgc_jax.data.readers``).

A check either returns the cleaned value or raises ``BadField(field, expected, got)``; the
reader adds the file and the record and hands it to its ``Validator`` (strict: raise,
skip: drop that one record). File-level problems (the annotation file itself unreadable)
raise ``DataValidationError`` directly, under both policies.

Image files are checked in two depths:

- always: the file exists, is non-empty, has a header PIL identifies, is a format OpenCV
  decodes (JPEG, PNG, BMP, TIFF, WebP), and is complete. Completeness is cheap for normal
  files: a JPEG must end with its end-of-image marker (``FF D9``) and a PNG with its
  ``IEND`` chunk. A file that does not is fully decoded with PIL (truncated loading off): a
  truncated file fails that decode, while a complete image followed by trailing bytes (some
  cameras append data after the marker) decodes and is accepted. ``cv2.imread`` is not used
  for this: it returns a truncated JPEG with the missing part grey (``cv2.imdecode`` of the
  same bytes fails; ``records.read_image`` uses that).
- ``deep``: additionally decode every file fully, with PIL (errors in the pixel data) and
  with OpenCV (the decoder the pipeline uses).
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections import Counter
from typing import Any

from tbgc_jax.data.records import DataValidationError, read_image

ID_LIMIT = 2**31  # image and category ids travel as int32 (-1 marks padding)
OPENCV_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP")
_PNG_END = bytes.fromhex("0000000049454e44ae426082")  # the IEND chunk


class _Missing:
  def __repr__(self) -> str:
    return "<missing>"


MISSING = _Missing()  # the ``got`` of a field that is absent


class BadField(Exception):
  """One record's field is not what the format requires.

  ``record`` (optional) names a sub-record (an annotation of an image) when it, rather than
  the record being read, holds the bad field.
  """

  def __init__(self, field: str, expected: str, got: Any, record: str | None = None):
    super().__init__(field, expected, got)
    self.field, self.expected, self.got, self.record = field, expected, got, record


class JsonObject(dict):
  """A JSON object that remembers keys given more than once (``{key: count}``)."""

  duplicate_keys: dict[str, int]


def _object_pairs(pairs: list[tuple[str, Any]]) -> JsonObject:
  obj = JsonObject(pairs)
  obj.duplicate_keys = {}
  if len(obj) != len(pairs):
    counts = Counter(k for k, _ in pairs)
    obj.duplicate_keys = {k: n for k, n in counts.items() if n > 1}
  return obj


def load_json(path: str) -> Any:
  """Loads a JSON annotation file; ``DataValidationError`` naming the file if unusable.

  A UTF-8 byte-order mark is stripped. Objects come back as ``JsonObject`` (duplicate keys
  recorded, the last value kept, as ``json`` does).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: annotation file not found")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise DataValidationError(f"{path}: whole file: expected a JSON document, got an empty file")
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataValidationError(f"{path}: whole file: expected UTF-8 JSON, got bytes that are "
                              f"not UTF-8 ({e})") from e
  try:
    return json.loads(text, object_pairs_hook=_object_pairs)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, int digit limit, deep nesting
    raise DataValidationError(f"{path}: whole file: expected valid JSON, got "
                              f"{type(e).__name__}: {e}") from e


def top_level(path: str, data: Any, spec: dict[str, type]) -> None:
  """Checks the top-level object of an annotation file (file-level: raises).

  Args:
    path: the file (for the message).
    data: its parsed content.
    spec: required key -> ``list`` or ``dict``.
  """
  kind = {list: "list", dict: "object"}
  want = ", ".join(f"{k!r} ({kind[t]})" for k, t in spec.items())
  if not isinstance(data, dict):
    raise DataValidationError(f"{path}: top level: expected a JSON object with {want}, got "
                              f"{type_name(data)}")
  dups = getattr(data, "duplicate_keys", {})
  for key, typ in spec.items():
    if key in dups:
      raise DataValidationError(f"{path}: top level: field {key!r}: expected it once, got "
                                f"{dups[key]} times")
    if not isinstance(data.get(key), typ):
      got = "<missing>" if key not in data else type_name(data[key])
      raise DataValidationError(f"{path}: top level: field {key!r}: expected a JSON "
                                f"{kind[typ]}, got {got}")


def type_name(x: Any) -> str:
  """The JSON name of a parsed value's type ("object", "array", "string", ...)."""
  names = {dict: "object", JsonObject: "object", list: "array", str: "string", bool: "boolean",
           type(None): "null", int: "integer", float: "number"}
  return names.get(type(x), type(x).__name__)


def obj(x: Any, what: str) -> dict:
  """``x`` must be a JSON object without duplicate keys."""
  if not isinstance(x, dict):
    raise BadField(what, "a JSON object", x)
  dups = getattr(x, "duplicate_keys", {})
  if dups:
    key = next(iter(dups))
    raise BadField(key, "the key once in the object", f"{dups[key]} values")
  return x


def field(o: dict, key: str, expected: str) -> Any:
  """``o[key]``, or ``BadField`` when the key is absent."""
  if key not in o:
    raise BadField(key, expected, MISSING)
  return o[key]


def int_id(x: Any, name: str) -> int:
  """An id: a JSON integer (not a boolean) in [0, 2**31)."""
  if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < ID_LIMIT:
    return x
  raise BadField(name, f"an integer id in [0, {ID_LIMIT})", x)


def number(x: Any) -> float:
  """A finite JSON number (not a boolean, string or null) as float; ``ValueError`` if not.

  The caller turns the ``ValueError`` into a ``BadField`` naming the whole box.
  """
  if isinstance(x, (int, float)) and not isinstance(x, bool):
    try:
      v = float(x)
    except OverflowError:
      v = math.inf
    if math.isfinite(v):
      return v
  raise ValueError(x)


def name_str(x: Any, name: str, expected: str = "a non-empty string") -> str:
  """A non-empty string without NUL bytes (field ``name``), else ``BadField``."""
  if isinstance(x, str) and x and "\x00" not in x:
    return x
  raise BadField(name, expected, x)


def require_folder(path: str, what: str) -> None:
  """``FileNotFoundError`` naming ``path`` unless it is a folder (a file-level problem)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: {what} not found (expected a folder)")


class Paths:
  """Resolves file names of one read against the dataset root; one object per read.

  Unless ``allow_outside_root``, a name must resolve (``..`` and symlinks included) inside
  ``root``. Folders are resolved once per read (cached); the file itself is checked for
  being a symlink on every call. ``new_file`` also rejects a file an earlier record named.

  Args:
    root: the dataset root.
    allow_outside_root: accept names that resolve outside ``root``.
  """

  def __init__(self, root: str, allow_outside_root: bool = False):
    self.root = root
    self.allow_outside_root = allow_outside_root
    self._real_root = os.path.realpath(root)
    self._real_dirs: dict[str, str] = {}
    self._seen: dict[str, str] = {}

  def _realpath(self, path: str) -> str:
    folder, base = os.path.split(path)
    if base in ("", ".", "..") or os.path.islink(path):
      return os.path.realpath(path)
    if folder not in self._real_dirs:
      self._real_dirs[folder] = os.path.realpath(folder)
    return os.path.join(self._real_dirs[folder], base)

  def resolve(self, rel: Any, name: str) -> tuple[str, str]:
    """(``root/rel``, its real path); ``BadField`` for a bad name or one outside the root."""
    rel = name_str(rel, name, "a non-empty file name")
    path = os.path.join(self.root, rel)
    real = self._realpath(path)
    if not self.allow_outside_root and os.path.commonpath([self._real_root, real]) != \
        self._real_root:
      raise BadField(name, f"a path inside the dataset root {self.root} "
                           "(allow_outside_root=False)", rel)
    return path, real

  def inside(self, rel: Any, name: str) -> str:
    """``root/rel``, checked to lie inside the root (see the class docstring)."""
    return self.resolve(rel, name)[0]

  def new_file(self, rel: Any, name: str, record: str) -> str:
    """``inside(...)``, and not a file an earlier ``record`` of this read named."""
    path, real = self.resolve(rel, name)
    if real in self._seen:
      raise BadField(name, f"a file no earlier record names ({self._seen[real]} names it)",
                     rel)
    self._seen[real] = record
    return path


def _complete(tail: bytes, fmt: str) -> bool:
  """Cheap end-marker test on the file's last bytes; False: "decode fully to find out"."""
  if fmt in ("JPEG", "MPO"):
    return tail.endswith(b"\xff\xd9")
  if fmt == "PNG":
    return tail == _PNG_END
  return True


def _pil_decode(path: str) -> None:
  from PIL import Image, ImageFile

  if ImageFile.LOAD_TRUNCATED_IMAGES:  # a process-wide switch: refuse rather than pass
    raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images cannot "
                       "be detected; set it back to False")
  with Image.open(path) as im:
    try:
      im.load()
    except Exception as e:  # noqa: BLE001 - any decoder error means "not decodable"
      raise _DecodeError(f"{type(e).__name__}: {e}") from e


class _DecodeError(Exception):
  pass


def image_file(path: str, name: str, deep: bool = False, modes: tuple[str, ...] | None = None,
               formats: tuple[str, ...] = OPENCV_FORMATS) -> tuple[int, int]:
  """Checks an image file (see the module docstring); returns (h, w) from its header.

  Args:
    path: the file.
    name: the record's field that names it (for the error).
    deep: decode it fully (PIL and OpenCV).
    modes: accepted PIL modes (e.g. ``("L",)`` for label maps); None: any.
    formats: accepted PIL formats.
  """
  from PIL import Image

  try:
    st = os.stat(path)
  except (OSError, ValueError):
    st = None
  if st is None or not stat.S_ISREG(st.st_mode):
    raise BadField(name, "an existing image file", path)
  if st.st_size == 0:
    raise BadField(name, "a readable image file", f"{path}: empty file (0 bytes)")
  try:
    with open(path, "rb") as f, Image.open(f) as im:
      w, h = im.size
      fmt, mode = im.format, im.mode
      f.seek(max(0, st.st_size - len(_PNG_END)))
      tail = f.read()
  except Exception as e:  # noqa: BLE001 - any PIL error means "unreadable"
    raise BadField(name, "a readable image file", f"{path}: {type(e).__name__}: {e}") from e
  if fmt not in formats:
    raise BadField(name, f"an image in one of the formats {', '.join(formats)}",
                   f"{path}: {fmt}")
  if modes is not None and mode not in modes:
    raise BadField(name, f"an image of PIL mode {' or '.join(modes)} (8-bit single channel)",
                   f"{path}: mode {mode}")
  try:
    if deep or not _complete(tail, fmt):
      _pil_decode(path)
    if deep and modes is None:
      read_image(path)
  except _DecodeError as e:
    raise BadField(name, "a complete, decodable image file", f"{path}: {e}") from e
  except DataValidationError as e:
    raise BadField(name, "a complete, decodable image file", f"{path}: OpenCV: {e}") from e
  return h, w
