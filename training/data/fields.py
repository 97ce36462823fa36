"""Reading the columns that manifests share (the indexer's image manifests and the forget manifests).

``tags`` is a list (jsonl, parquet) or one string split on ``|``, ``;`` or ``,`` (csv); a string that
holds a JSON list is read as that list.
"""

from __future__ import annotations

import json
from typing import Any


def json_kind(v: Any) -> str:
    """A value's type in the words of JSON, for messages."""
    names = {dict: "an object", list: "a list", tuple: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null", bytes: "binary data"}
    return names.get(type(v), type(v).__name__)


def parse_tags(value: Any) -> tuple[str, ...]:
    """Tags from a list or a separated string; ValueError for anything else (an object, nested lists)."""
    if value is None:
        return ()
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                return parse_tags(json.loads(s))
            except (json.JSONDecodeError, RecursionError):
                pass
        for sep in "|;,":
            s = s.replace(sep, "\x00")
        return tuple(t.strip() for t in s.split("\x00") if t.strip())
    if isinstance(value, (list, tuple)):
        bad = [t for t in value if t is not None and not isinstance(t, (str, int, float))]
        if bad:
            raise ValueError(f"tags must be strings, not {json_kind(bad[0])}")
        return tuple(str(t).strip() for t in value if t is not None and str(t).strip())
    if isinstance(value, (int, float)):
        return (str(value),)
    raise ValueError(f"tags must be a list of strings or one string separated by | ; or , (not {json_kind(value)})")
