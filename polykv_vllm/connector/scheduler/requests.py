"""Request tracking: what the index remembers about each request between vLLM's hooks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from polykv_vllm.connector.scheduler.entries import DocKey, Entry
from polykv_vllm.connector.scheduler.params import DocParams, parse_doc_params

__all__ = ["LoadInFlight", "RequestLike", "RequestState", "ScheduledReq"]


class RequestLike(Protocol):
    """The attributes of ``vllm.v1.request.Request`` the index reads (live objects)."""

    @property
    def request_id(self) -> str: ...
    @property
    def block_hashes(self) -> Sequence[Any]: ...  # hashable chained block hashes
    @property
    def num_tokens(self) -> int: ...
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def kv_transfer_params(self) -> dict[str, Any] | None: ...
    @property
    def cache_salt(self) -> str | None: ...


class ScheduledReq(NamedTuple):
    """One request scheduled this step, as :meth:`~.store_index.StoreIndex.plan_step` needs it.

    ``block_ids``: the blocks added this step (or all of them when ``replace``);
    ``computed_after``: tokens whose KV exists once this step's forward ran. (A named tuple:
    one is built per running request per step, a frozen dataclass cost 5x more.)
    """

    req_id: str
    block_ids: tuple[int, ...]
    replace: bool
    computed_after: int


@dataclass(eq=False)
class RequestState:
    """A live request: its parameters and tenant, its blocks, how far its prompt is stored,
    its document, and what its receipt will say."""

    request: RequestLike
    params: DocParams
    tenant: str | None
    block_ids: list[int] = field(default_factory=list)
    next_store_block: int = 0
    store_done: bool = False  # nothing of the prompt is left to store: plan_step skips it fast
    tokens_from_store: int = 0
    tokens_stored: int = 0
    doc: DocKey | None = None
    pin_refused: str | None = None

    @classmethod
    def of(cls, request: RequestLike) -> RequestState:
        return cls(
            request=request,
            params=parse_doc_params(request.kv_transfer_params),
            tenant=getattr(request, "cache_salt", None),
        )

    def prompt_keys(self, block_size: int) -> tuple[Any, ...]:
        """Block hashes of the prompt's full blocks."""
        req = self.request
        return tuple(req.block_hashes[: req.num_prompt_tokens // block_size])


@dataclass(eq=False)
class LoadInFlight:
    """A planned load, from :meth:`~.store_index.StoreIndex.on_alloc` until every rank reported
    it: its entries hold a reference (``Entry.refs``) the whole time."""

    load_id: int
    req_id: str
    entries: list[Entry]
    ranks_done: int = 0
    loaded_blocks: int = field(init=False)  # the minimum over the ranks that reported
    failed_rows: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.loaded_blocks = len(self.entries)
