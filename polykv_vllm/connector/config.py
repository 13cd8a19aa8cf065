"""The connector's options: the frozen :class:`PolyKVConfig`, parsed once at the edge.

``PolyKVConfig.from_extra_config(dict)`` turns vLLM's untyped ``kv_connector_extra_config`` into
a validated, immutable config; :func:`kv_transfer_config` builds the ``KVTransferConfig`` that
selects the connector (the only place this module imports vLLM). Options and their meaning:
``docs/CONNECTOR.md``.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal, Union, get_args, get_origin, get_type_hints

from polykv_vllm.core import PRESETS

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig

__all__ = [
    "CONNECTOR_CLASS",
    "CONNECTOR_MODULE",
    "OptionSpec",
    "PIN_TOKEN_ENV",
    "PolyKVConfig",
    "ResolvedConfig",
    "format_size",
    "kv_transfer_config",
    "option_specs",
    "parse_size",
]

CONNECTOR_CLASS = "PolyKVConnector"
CONNECTOR_MODULE = "polykv_vllm.connector.connector"

Placement = Literal["gpu", "cpu"]
StorePolicy = Literal["all", "tagged"]
PinMode = Literal["off", "any", "token"]
Eviction = Literal["lru", "tinylfu", "s3fifo"]
AsyncLoad = Literal["auto", "on", "off"]

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
    - ``profile``: a layer-wise codec profile JSON made for this model by ``polykv-vllm
      calibrate``; replaces ``preset``. A profile made for another model is refused at start.
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
    - ``eviction``: which stored blocks make room, and for what: ``"lru"`` (the default)
      evicts the least recently used for every new block; ``"tinylfu"`` stores a new block in
      its place only if that block was asked for more often, so scans and cycles larger than
      the store do not flush it (it loses where recency is what counts: ``docs/CONNECTOR.md``);
      ``"s3fifo"``: S3-FIFO, new blocks in a small FIFO, those asked for again moved to the main
      one, so one-shot blocks leave first while a new document still enters at once.
    - ``async_load``: load stored blocks while other requests keep running: ``"on"`` (the
      request waits in vLLM's WAITING_FOR_REMOTE_KVS until the worker finished its load: a CUDA
      side stream, or a background thread on a CPU build), ``"off"`` (the load runs inside the
      step that needs it), or ``"auto"`` (the default: on for placement cpu on CUDA, where the
      host-to-device copy dominates; off elsewhere, where small loads are faster inline). A
      load reaching into the disk or Redis tier is asynchronous whatever this says.
    - ``registry_path``: a JSON file where the OpenAI server keeps the documents registered
      through ``/v1/polykv/documents`` (canonical tokens, written atomically), so they survive a
      restart; None: in memory only (``docs/DOCUMENTS.md``).
    - ``disk_path``: a directory for the persistent disk tier below the store (None: no disk
      tier); entries survive restarts and are shared by the servers that use the same
      directory (``docs/TIERS.md``).
    - ``disk_bytes``: byte budget of the disk tier, summed over all workers (LRU eviction).
    - ``remote``: ``redis://HOST:PORT/DB`` of a Redis (or Valkey) shared by several servers as
      the tier below the disk (None: no remote tier).
    """

    preset: str = "polykv"
    profile: str | None = None
    store_bytes: int = 1024**3
    placement: Placement | None = None
    store: StorePolicy = "all"
    min_store_tokens: int | None = None
    pin: PinMode = "any"
    pin_quota: int | None = None
    eviction: Eviction = "lru"
    async_load: AsyncLoad = "auto"
    registry_path: str | None = None
    disk_path: str | None = None
    disk_bytes: int = 50 * 1024**3
    remote: str | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(
                f"polykv option preset={self.preset!r} is unknown: allowed presets are "
                f"{sorted(PRESETS)}."
            )
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile):
            raise ValueError(
                f"polykv option profile={self.profile!r} must be the path of a profile JSON "
                "written by `polykv-vllm calibrate` (or unset to use the preset)."
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

        if self.registry_path is not None and (
            not isinstance(self.registry_path, str) or not self.registry_path
        ):
            raise ValueError(
                f"polykv option registry_path={self.registry_path!r} must be a file path (or "
                "unset to keep registered documents in memory only)."
            )
        if self.eviction not in get_args(Eviction):
            raise ValueError(
                f"polykv option eviction={self.eviction!r} is invalid: allowed are 'lru', "
                "'tinylfu' (frequency admission: resists scans and cycles) and 's3fifo' (small "
                "and main FIFOs: resists scans, keeps recency)."
            )
        if self.async_load not in get_args(AsyncLoad):
            raise ValueError(
                f"polykv option async_load={self.async_load!r} is invalid: allowed are 'auto' "
                "(on for placement cpu on CUDA), 'on' and 'off'."
            )
        if self.disk_path is not None and (
            not isinstance(self.disk_path, str) or not self.disk_path
        ):
            raise ValueError(
                f"polykv option disk_path={self.disk_path!r} must be a directory path (or unset "
                "for no disk tier)."
            )
        if not isinstance(self.disk_bytes, int) or self.disk_bytes <= 0:
            raise ValueError(
                f"polykv option disk_bytes={self.disk_bytes!r} must be a positive number of "
                "bytes; pass an int or a size string such as '50GiB'."
            )
        if self.remote is not None and (
            not isinstance(self.remote, str)
            or not self.remote.startswith(("redis://", "rediss://", "unix://"))
        ):
            raise ValueError(
                f"polykv option remote={self.remote!r} must be a Redis URL such as "
                "redis://127.0.0.1:6379/0 (or unset for no remote tier)."
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
        if "disk_bytes" in extra:
            extra["disk_bytes"] = parse_size(extra["disk_bytes"], field="disk_bytes")
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

    def resolve(self, *, block_size: int, cpu_platform: bool) -> ResolvedConfig:
        """This config with the defaults that depend on the engine filled in, once.

        ``placement``: on a CPU build the store can only live in host memory, so it resolves to
        ``"cpu"`` whatever was asked; elsewhere unset means ``"gpu"``. ``min_store_tokens``:
        unset means one block of ``block_size`` tokens. ``async_load``: ``"auto"`` becomes
        ``"on"`` for a host-memory store on CUDA (not a CPU build) and ``"off"`` otherwise.
        Every other field is kept as given.
        """
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive number of tokens.")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["placement"] = "cpu" if cpu_platform else (self.placement or "gpu")
        values["min_store_tokens"] = self.min_store_tokens or block_size
        if self.async_load == "auto":
            host_store_on_cuda = not cpu_platform and values["placement"] == "cpu"
            values["async_load"] = "on" if host_store_on_cuda else "off"
        return ResolvedConfig(**values)


@dataclass(frozen=True)
class ResolvedConfig(PolyKVConfig):
    """A :class:`PolyKVConfig` after :meth:`PolyKVConfig.resolve`: no option is left unset.

    ``placement`` is ``"gpu"`` (the KV cache's device) or ``"cpu"`` (host memory; pinned on
    CUDA), ``min_store_tokens`` a number of tokens, ``async_load`` ``"on"`` or ``"off"``.
    """

    placement: Placement = "gpu"
    min_store_tokens: int = 1
    async_load: AsyncLoad = "off"

    @property
    def load_async(self) -> bool:
        """Loads run asynchronously (``async_load="on"``): vLLM's WAITING_FOR_REMOTE_KVS."""
        return self.async_load == "on"

    @property
    def store_all(self) -> bool:
        """Store every prompt's full blocks (``store="all"``), not only tagged requests'."""
        return self.store == "all"


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


# --- the option table: CLI flags, argument lists and docs come from PolyKVConfig's fields -----

CLI_PREFIX = "--polykv-"


@dataclass(frozen=True)
class OptionSpec:
    """How one :class:`PolyKVConfig` field is spelled on the command line and in the docs.

    Built by :func:`option_specs` from the field itself: its type (``Literal`` gives the
    choices, ``int`` an integer flag), its default, and its bullet in the class docstring
    (``help``); :data:`_SPEC_OVERRIDES` only adds what a type cannot say.
    """

    name: str  # the field, i.e. the kv_connector_extra_config key
    flag: str  # --polykv-<name with - for _>
    help: str
    default: Any
    default_text: str
    choices: tuple[str, ...] | None = None
    value_type: type = str  # what argparse turns the flag's text into
    metavar: str | None = None

    def format(self, value: Any) -> str:
        """``value`` as this flag's text (sizes as ``512MiB`` where exact)."""
        return format_size(value) if self.name in _SIZE_FIELDS else str(value)


# What a field's type cannot say: computed choices, a size that is typed as text, a default
# that depends on the platform.
_SPEC_OVERRIDES: dict[str, dict[str, Any]] = {
    "preset": {"choices": lambda: tuple(sorted(PRESETS))},
    "profile": {"metavar": "FILE", "default_text": "none (the preset)"},
    "store_bytes": {"value_type": str, "metavar": "SIZE"},
    "placement": {"default_text": "gpu on CUDA, cpu on CPU"},
    "min_store_tokens": {"default_text": "one block"},
    "pin_quota": {"value_type": str, "metavar": "SIZE", "default_text": "half of store_bytes"},
    "async_load": {"default_text": "auto (on for placement cpu on CUDA)"},
    "registry_path": {"metavar": "FILE", "default_text": "in memory"},
    "disk_path": {"metavar": "DIR", "default_text": "no disk tier"},
    "disk_bytes": {"value_type": str, "metavar": "SIZE"},
    "remote": {"metavar": "URL", "default_text": "no remote tier"},
}
_SIZE_FIELDS = frozenset({"store_bytes", "pin_quota", "disk_bytes"})
_BINARY_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def format_size(n: int) -> str:
    """``n`` bytes in the largest binary unit that divides it exactly (``"512MiB"``), else
    the plain number; :func:`parse_size` reads it back to ``n``."""
    for unit, size in _BINARY_UNITS:
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _docstring_bullets(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``- ``name``: text`` bullets of ``cls``'s docstring."""
    bullets: dict[str, str] = {}
    name = None
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
        m = re.match(r"^- ``(\w+)``: (.*)$", line)
        if m:
            name = m.group(1)
            bullets[name] = m.group(2)
        elif name is not None and line.startswith("  "):
            bullets[name] += " " + line.strip()
        else:
            name = None
    return {k: v.replace("``", "") for k, v in bullets.items()}


def _unwrap_optional(hint: Any) -> Any:
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def option_specs() -> list[OptionSpec]:
    """One :class:`OptionSpec` per :class:`PolyKVConfig` field, in field order.

    A ``Literal`` of strings becomes a choice, ``int`` / ``float`` / ``str`` a typed flag, any
    other type a text flag that :meth:`PolyKVConfig.from_extra_config` parses and validates.
    """
    hints = get_type_hints(PolyKVConfig)
    bullets = _docstring_bullets(PolyKVConfig)
    specs = []
    for f in fields(PolyKVConfig):
        hint = _unwrap_optional(hints[f.name])
        spec: dict[str, Any] = {}
        if get_origin(hint) is Literal:
            spec["choices"] = tuple(str(a) for a in get_args(hint))
        elif hint in (int, float, str):
            spec["value_type"] = hint
            spec["metavar"] = {int: "N", float: "X", str: None}[hint]
        else:  # e.g. int | str: the text goes to from_extra_config, which validates it
            spec["metavar"] = "VALUE"
        spec.update(_SPEC_OVERRIDES.get(f.name, {}))
        if callable(spec.get("choices")):
            spec["choices"] = spec["choices"]()
        default_text = spec.pop("default_text", None)
        option = OptionSpec(
            name=f.name,
            flag=CLI_PREFIX + f.name.replace("_", "-"),
            help=bullets.get(f.name, ""),
            default=f.default,
            default_text="",
            **spec,
        )
        if default_text is None:
            default_text = "unset" if f.default is None else option.format(f.default)
        specs.append(replace(option, default_text=default_text))
    return specs
