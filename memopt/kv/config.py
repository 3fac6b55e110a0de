"""The JSON plumbing every KV policy config shares: frozen dataclasses that round-trip through
`to_json()` / `kv_config_from_json()`, tagged with a `type` and a schema `version`.

Torch-free on purpose, so the planner and the CLI can build and print policies cheaply.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

KV_CONFIG_VERSION = 1
_REGISTRY: dict[str, type] = {}


class KVConfig:
    """Base of the KV policy configs: subclasses are frozen dataclasses with a `kind`."""

    kind: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def to_json(self) -> dict:
        out = {"type": self.kind, "version": KV_CONFIG_VERSION}
        for f in fields(self):
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def from_json(cls, d: dict) -> "KVConfig":
        config = kv_config_from_json(d)
        if not isinstance(config, cls):
            raise ValueError(f"expected a {cls.kind!r} config, got type {d.get('type')!r}")
        return config


def kv_config_from_json(d: Any) -> KVConfig:
    """Any KV config from its `to_json()` form, nested configs included (dispatching on `type`)."""
    from memopt.jsonconfig import config_from_json

    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _REGISTRY:
        raise ValueError(f"unknown KV config type {kind!r}; accepted: {sorted(_REGISTRY)}")
    decoded = {k: v if k in ("type", "version") else _decode(v) for k, v in d.items()}
    return config_from_json(_REGISTRY[kind], decoded, kind, KV_CONFIG_VERSION)


def _encode(value: Any) -> Any:
    if isinstance(value, KVConfig):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "type" in value:
        return kv_config_from_json(value)
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def check_int(owner: str, name: str, value: Any, minimum: int = 0) -> None:
    """ValueError naming `owner.name` unless `value` is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


__all__ = ["KV_CONFIG_VERSION", "KVConfig", "kv_config_from_json", "check_int", "check_choice"]
