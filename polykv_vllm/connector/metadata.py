"""Small picklable messages between the scheduler side and the worker side.

Scheduler → worker (:class:`StepPlan`, one per engine step): which slab rows to decompress into
which paged blocks (loads), which freshly computed blocks to compress into which rows (stores),
and which rows no longer hold a stored block (freed). The scheduler side decides every row
(:mod:`~.scheduler.rows`); the worker executes the plan and keeps no placement of its own.
Worker → scheduler (:class:`WorkerReport`): which stores landed, with their real byte counts,
and how each load went. Only ints travel: slab rows, load ids and vLLM block numbers; never
tensors. (A *row* is one stored block in the compressed store; the kernels' *slots* are token
positions in the paged cache: the two words never mean the same thing.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockJob", "FetchJob", "LoadJob", "StepPlan", "WorkerReport"]


@dataclass(frozen=True)
class BlockJob:
    """One request's transfer: slab row ``rows[i]`` ↔ paged block ``block_ids[i]``, in token
    order. Each row holds exactly one full block of ``block_size`` tokens (all layers)."""

    req_id: str
    rows: tuple[int, ...]
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        assert len(self.rows) == len(self.block_ids), "one row per block"


@dataclass(frozen=True)
class LoadJob(BlockJob):
    """A load; ``load_id`` names it in the worker's report (:attr:`WorkerReport.loads`).

    ``async_load``: vLLM holds the request in WAITING_FOR_REMOTE_KVS, so the load may finish in
    a later step; the worker reports it (and ``req_id`` in ``get_finished``) in the step it
    finished. Otherwise it finishes before this step's forward."""

    load_id: int
    async_load: bool = False


@dataclass(frozen=True)
class FetchJob:
    """Tier fetch of a load (``docs/TIERS.md``): rows ``rows[first:]`` of load ``load_id`` are
    read from the tiers (polykv chain keys ``keys``, in order) before the load runs."""

    load_id: int
    first: int
    keys: tuple[bytes, ...]


@dataclass
class StepPlan:
    """The work of one step, applied by the worker in this order: loads (in ``start_load_kv``;
    an async one only starts there), then ``freed_rows`` (marked empty; never a row an
    unfinished load reads: its entry holds a reference until the load is reported), then stores
    (after the forward, in ``wait_for_save``)."""

    loads: list[LoadJob] = field(default_factory=list)
    stores: list[BlockJob] = field(default_factory=list)
    freed_rows: list[int] = field(default_factory=list)
    # tiers (docs/TIERS.md): fetches by load id, run before their load; the rows of ``stores``
    # with their chain keys, written through to the tiers once stored; chain keys whose
    # entries a pinned document pins (True) or no longer pins (False) in the tiers
    fetches: dict[int, FetchJob] = field(default_factory=dict)
    tier_puts: list[tuple[int, bytes]] = field(default_factory=list)
    tier_pins: list[tuple[bytes, bool]] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.freed_rows)


@dataclass
class WorkerReport:
    """What the workers did in one step, merged over ranks by :meth:`merge`.

    - ``stored``: row → ``[bytes, ranks]``: real compressed bytes summed over ranks, and how
      many ranks confirmed the row (its entry is ready once all ranks did).
    - ``loads``: load id → ``[ranks, loaded_blocks]``: how many ranks ran the load, and how many
      of its blocks (from the first) every one of them loaded (the minimum over ranks; the rest
      are recomputed). A rank reports an async load in the step it finished there.
    - ``failed_rows``: rows a load found missing or invalid (the scheduler drops their entries;
      the worker changes nothing on its own).
    - ``rank_bytes``: tensor-parallel rank → bytes its store holds (measured from its slab),
      sent by a rank when the figure changed; ranks are distinct, so merging is a union.
    """

    stored: dict[int, list[int]] = field(default_factory=dict)
    loads: dict[int, list[int]] = field(default_factory=dict)
    failed_rows: set[int] = field(default_factory=set)
    rank_bytes: dict[int, int] = field(default_factory=dict)

    def merge(self, other: WorkerReport) -> WorkerReport:
        out = WorkerReport(
            stored={k: list(v) for k, v in self.stored.items()},
            loads={k: list(v) for k, v in self.loads.items()},
            failed_rows=set(self.failed_rows) | other.failed_rows,
            rank_bytes={**self.rank_bytes, **other.rank_bytes},
        )
        for row, (nbytes, ranks) in other.stored.items():
            cur = out.stored.setdefault(row, [0, 0])
            cur[0] += nbytes
            cur[1] += ranks
        for load_id, (ranks, loaded) in other.loads.items():
            if load_id in out.loads:
                cur = out.loads[load_id]
                out.loads[load_id] = [cur[0] + ranks, min(cur[1], loaded)]
            else:
                out.loads[load_id] = [ranks, loaded]
        return out

    def is_empty(self) -> bool:
        return not (self.stored or self.loads or self.failed_rows or self.rank_bytes)
