"""Settings as text: a TOML file of `[section]` tables and `section.field=value` overrides, each
flattened to `section.field` keys (config.py types and checks them)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from opd.errors import OpdError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def parse_kv(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OpdError(f"bad override {item!r}: expected section.field=value")
        out[key.strip()] = value.strip()
    return out


def read_toml(path: str) -> dict[str, Any]:
    """Flatten a TOML file with [section] tables into `section.field` keys."""
    p = Path(path)
    if not p.is_file():
        raise OpdError(f"config file not found: {path}")
    try:
        data = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise OpdError(f"{path}: invalid TOML: {e}") from None
    flat = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise OpdError(f"{path}: top-level key {section!r} must be a [section] table")
        for name, value in table.items():
            flat[f"{section}.{name}"] = value
    return flat
