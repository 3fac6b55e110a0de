"""One reader for the versioned JSON form every frozen config dataclass writes:
`{"type": kind, "version": N, **fields}`. Torch-free."""

from __future__ import annotations

from dataclasses import fields


def config_from_json(cls, d: dict, kind: str, version: int):
    """Build `cls` from `d`, checking its type tag and version and naming any unknown field."""
    if not isinstance(d, dict) or d.get("type") != kind:
        raise ValueError(f"expected a {kind!r} config, got type {d.get('type') if isinstance(d, dict) else d!r}")
    if d.get("version") != version:
        raise ValueError(f"{kind} config version {d.get('version')!r} is not supported "
                         f"(this memopt reads version {version})")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names - {"type", "version"})
    if unknown:
        raise ValueError(f"unknown {kind} config fields {unknown}; accepted: {sorted(names)}")
    return cls(**{k: v for k, v in d.items() if k in names})
