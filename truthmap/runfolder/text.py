"""Text read from a run folder or written to one: strict JSON, the size caps of JSON files, and text
made safe to print.

``parse_json`` is the one JSON parser of run-folder files (no NaN, no key hook surprises, no lone
surrogates, nesting at most MAX_JSON_DEPTH); ``dumps`` the one writer (NaN and infinities as null).
``read_capped`` reads at most a cap of bytes, so that a huge document is refused before it is parsed.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .names import CHUNK_PLAN, CONFIG, STAGES, SUMMARY

def sanitise(text, limit: int = 300) -> str:
    """Text from a file or a model, safe to print on a terminal: control characters (escape sequences,
    carriage returns, lone surrogates) shown escaped, and at most ``limit`` characters."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    out = []
    for ch in text:
        code = ord(ch)
        if code < 32 or 127 <= code < 160 or 0xD800 <= code < 0xE000 or code in (0x2028, 0x2029, 0x202E, 0x2066,
                                                                                  0x2067, 0x2068, 0x2069):
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                       if code < 0xD800 or code >= 0xE000 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)



def safe_key(key) -> bool:
    """Whether ``key`` (from a manifest, an index, a card…) is a relative path that stays in its folder."""
    if not isinstance(key, str) or not key or "\\" in key or "\x00" in key or key.startswith("/"):
        return False
    parts = key.split("/")
    try:  # a name longer than any file system holds (ENAMETOOLONG on every check) is no file of a run
        if len(key.encode("utf-8")) > 1024 or any(len(part.encode("utf-8")) > 255 for part in parts):
            return False
    except UnicodeEncodeError:
        return False
    return all(part not in ("", ".", "..") for part in parts)



def dumps(obj, indent: int | None = 2) -> str:
    """``json.dumps`` with numpy values, and NaN or infinite numbers as null (strict JSON has neither)."""
    return json.dumps(finite(json.loads(json.dumps(obj, default=json_default))), indent=indent, allow_nan=False)


def finite(obj):
    """``obj`` with every NaN or infinite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


MAX_JSON_DEPTH = 100  # deeper nesting is refused before the parser could run out of stack


def parse_json(data: bytes | str, object_pairs_hook=None):
    """Strict JSON: ValueError (with the reason) for non-UTF-8 bytes, lone surrogates, NaN or infinities,
    nesting deeper than MAX_JSON_DEPTH, or anything json refuses."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 text (byte {err.start})") from None
    _check_depth(data)
    try:
        value = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float,
                           object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON: {err.msg} (line {err.lineno})") from None
    except RecursionError:  # pragma: no cover - _check_depth refuses such nesting first
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    _check_text(value)
    return value


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH (brackets inside strings are not counted)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
        elif ch in "]}":
            depth -= 1


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: no JSON number is infinite, and a NaN check would let it pass
        raise ValueError(f"{text[:40]} is beyond the range of a number")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_text(value) -> None:
    """Refuse strings holding lone surrogates (``"\\ud800"``): they are not text, and no file can hold them."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"a string holds a lone surrogate (\\u{ord(item[err.start]):04x}), which is not text") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


MAX_JSON_BYTES = 256 << 20  # splits.json and index.json list every id: a few MB per million questions
MAX_JSON_BYTES_OF = {CONFIG: 1 << 20, SUMMARY: 16 << 20, STAGES: 16 << 20, CHUNK_PLAN: 1 << 20}


def read_capped(path: Path, cap: int) -> bytes:
    """The bytes of ``path``, never more than ``cap`` read: ValueError (with the size) for a larger file,
    so that a huge or sparse JSON document is refused before it is parsed (parsing takes several times
    its size in memory)."""
    with open(path, "rb") as f:
        data = f.read(cap + 1)
        if len(data) > cap:
            size = os.fstat(f.fileno()).st_size
            raise ValueError(f"{size} bytes, more than the {cap} this file may hold")
    return data


def json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")

