"""The connector's options: the frozen :class:`PolyKVConfig`, parsed once at the edge.

``PolyKVConfig.from_extra_config(dict)`` turns vLLM's untyped ``kv_connector_extra_config`` into
a validated, immutable config; :func:`kv_transfer_config` builds the ``KVTransferConfig`` that
selects the connector (the only place this module imports vLLM). Options and their meaning:
``docs/CONNECTOR.md``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from polykv_vllm.core import PRESETS

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig

__all__ = [
    "CONNECTOR_CLASS",
    "CONNECTOR_MODULE",
    "PIN_TOKEN_ENV",
    "PolyKVConfig",
    "kv_transfer_config",
    "parse_size",
]

CONNECTOR_CLASS = "PolyKVConnector"
CONNECTOR_MODULE = "polykv_vllm.connector.connector"

Placement = Literal["gpu", "cpu"]
StorePolicy = Literal["all", "tagged"]
PinMode = Literal["off", "any", "token"]

#: the environment variable holding the secret of ``pin="token"`` (never a config value: the
#: engine logs its configuration)
PIN_TOKEN_ENV = "POLYKV_PIN_TOKEN"

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, field: str = "store_bytes") -> int:
    """Bytes from an int or a size string (``"512MiB"``, ``"2GiB"``, ``"1.5GB"``, ``"4096"``)."""
    if isinstance(value, bool):
        raise ValueError(f"{field}={value!r} is not a size: use an int of bytes or e.g. '512MiB'.")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(
                f"{field}={value!r} is not a size: use an int of bytes or a number with one of "
                "the units B, KB, MB, GB, KiB, MiB, GiB, TiB (e.g. '512MiB', '2GiB')."
            )
        n = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise ValueError(
            f"{field}={value!r} ({type(value).__name__}) is not a size: use an int of bytes or a "
            "string such as '512MiB'."
        )
    if n <= 0:
        raise ValueError(f"{field}={value!r} must be > 0 bytes, e.g. '512MiB'.")
    return n


@dataclass(frozen=True)
class PolyKVConfig:
    """Validated connector options (see ``docs/CONNECTOR.md``).

    - ``preset``: codec preset name (``polykv_vllm.core.PRESETS``).
    - ``store_bytes``: byte budget of the compressed store, summed over all workers.
    - ``placement``: ``"gpu"`` / ``"cpu"``, or None for the platform default (``"cpu"`` on a
      CPU build, ``"gpu"`` otherwise); on CUDA ``"cpu"`` means pinned host memory.
    - ``store``: ``"all"`` stores every prompt's full blocks, ``"tagged"`` only prompts of
      requests carrying a ``polykv.doc_id``.
    - ``min_store_tokens``: prompts shorter than this are not stored (None: one block).
    - ``pin``: who may pin documents: ``"off"`` (nobody), ``"any"`` (any request, the default,
      as before), ``"token"`` (requests carrying ``polykv.pin_token`` equal to the secret in the
      environment variable ``POLYKV_PIN_TOKEN``).
    - ``pin_quota``: compressed bytes one tenant (``cache_salt``; no salt is one tenant) may
      keep pinned; None: half of ``store_bytes`` (:meth:`pin_quota_bytes`).
    """

    preset: str = "polykv"
    store_bytes: int = 1024**3
    placement: Placement | None = None
    store: StorePolicy = "all"
    min_store_tokens: int | None = None
    pin: PinMode = "any"
    pin_quota: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"polykv option preset={self.preset!r} is unknown: allowed presets are "
                f"{sorted(PRESETS)}."
            )
        if not isinstance(self.store_bytes, int) or self.store_bytes <= 0:
            raise ValueError(
                f"polykv option store_bytes={self.store_bytes!r} must be a positive number of "
                "bytes; pass an int or a size string such as '512MiB' to from_extra_config."
            )
        if self.placement not in (None, "gpu", "cpu"):
            raise ValueError(
                f"polykv option placement={self.placement!r} is invalid: allowed are 'gpu' and "
                "'cpu' (or leave it unset for the platform default)."
            )
        if self.store not in ("all", "tagged"):
            raise ValueError(
                f"polykv option store={self.store!r} is invalid: allowed are 'all' (store every "
                "prompt) and 'tagged' (only requests with a polykv.doc_id)."
            )
        if self.min_store_tokens is not None and (
            isinstance(self.min_store_tokens, bool)
            or not isinstance(self.min_store_tokens, int)
            or self.min_store_tokens < 1
        ):
            raise ValueError(
                f"polykv option min_store_tokens={self.min_store_tokens!r} must be an integer "
                ">= 1 (or unset for one block)."
            )
        if self.pin not in ("off", "any", "token"):
            raise ValueError(
                f"polykv option pin={self.pin!r} is invalid: allowed are 'off' (nobody pins), "
                "'any' (any request pins) and 'token' (requests carrying the secret of "
                f"{PIN_TOKEN_ENV})."
            )
        if self.pin_quota is not None and (
            isinstance(self.pin_quota, bool)
            or not isinstance(self.pin_quota, int)
            or self.pin_quota <= 0
        ):
            raise ValueError(
                f"polykv option pin_quota={self.pin_quota!r} must be a positive number of bytes "
                "(or unset for half of store_bytes); pass an int or a size string such as "
                "'256MiB' to from_extra_config."
            )

    def pin_quota_bytes(self) -> int:
        """The per-tenant pinned-bytes quota: ``pin_quota``, or half of ``store_bytes``."""
        return self.pin_quota if self.pin_quota is not None else self.store_bytes // 2

    @classmethod
    def from_extra_config(cls, extra: Mapping[str, Any] | None) -> PolyKVConfig:
        """Parse ``kv_connector_extra_config``; unknown keys are rejected with the allowed ones."""
        extra = dict(extra or {})
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ValueError(
                f"unknown polykv option(s) {unknown} in kv_connector_extra_config: allowed keys "
                f"are {sorted(allowed)} (see docs/CONNECTOR.md)."
            )
        if "store_bytes" in extra:
            extra["store_bytes"] = parse_size(extra["store_bytes"])
        if extra.get("pin_quota") is not None:
            extra["pin_quota"] = parse_size(extra["pin_quota"], field="pin_quota")
        if "min_store_tokens" in extra and isinstance(extra["min_store_tokens"], str):
            text = extra["min_store_tokens"]
            if not text.strip().isdigit():
                raise ValueError(
                    f"polykv option min_store_tokens={text!r} must be an integer >= 1."
                )
            extra["min_store_tokens"] = int(text)
        return cls(**extra)

    def to_extra_config(self) -> dict[str, Any]:
        """The dict :meth:`from_extra_config` reads back (unset options left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def kv_transfer_config(**options: Any) -> KVTransferConfig:
    """The vLLM ``KVTransferConfig`` selecting the polykv connector with ``options``.

    ``options`` are the keys of :class:`PolyKVConfig` (validated here, so a bad option fails
    before the engine starts), e.g. ``kv_transfer_config(store_bytes="512MiB")``.
    """
    from vllm.config import KVTransferConfig

    config = PolyKVConfig.from_extra_config(options)
    return KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=config.to_extra_config(),
    )
