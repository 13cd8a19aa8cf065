"""Small picklable messages between the scheduler side and the worker side.

Scheduler → worker (:class:`StepPlan`, one per engine step): which stored entries to decompress
into which paged blocks (loads), which freshly computed blocks to compress into which new entries
(stores), and which entries to drop (evictions). Worker → scheduler (:class:`WorkerReport`): which
stores landed, with their real byte counts, and which loads failed. Only ints travel: entry ids
(``slot``, never reused) and vLLM block numbers; never tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BlockJob", "StepPlan", "WorkerReport"]


@dataclass(frozen=True)
class BlockJob:
    """One request's transfer: ``slots[i]`` ↔ paged block ``block_ids[i]``, in token order.

    Each slot holds exactly one full block of ``block_size`` tokens (all layers).
    """

    req_id: str
    slots: tuple[int, ...]
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        assert len(self.slots) == len(self.block_ids), "one slot per block"


@dataclass
class StepPlan:
    """The work of one step, applied by the worker in this order: loads (before the forward),
    stores (after it, in ``wait_for_save``), evictions (after the loads)."""

    loads: list[BlockJob] = field(default_factory=list)
    stores: list[BlockJob] = field(default_factory=list)
    evictions: list[int] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.loads or self.stores or self.evictions)


@dataclass
class WorkerReport:
    """What the workers did in one step, merged over ranks by :meth:`merge`.

    - ``stored``: slot → ``[bytes, ranks]``: real compressed bytes summed over ranks, and how
      many ranks confirmed the slot (a slot is ready once all ranks did).
    - ``failed_slots``: slots a load found missing or invalid (the scheduler drops them).
    - ``unloaded_tokens``: request id → tokens of its planned load that were not loaded (and are
      recomputed); the maximum over ranks.
    """

    stored: dict[int, list[int]] = field(default_factory=dict)
    failed_slots: set[int] = field(default_factory=set)
    unloaded_tokens: dict[str, int] = field(default_factory=dict)

    def merge(self, other: WorkerReport) -> WorkerReport:
        out = WorkerReport(
            stored={k: list(v) for k, v in self.stored.items()},
            failed_slots=set(self.failed_slots) | other.failed_slots,
            unloaded_tokens=dict(self.unloaded_tokens),
        )
        for rid, n in other.unloaded_tokens.items():
            out.unloaded_tokens[rid] = max(n, out.unloaded_tokens.get(rid, 0))
        for slot, (nbytes, ranks) in other.stored.items():
            cur = out.stored.setdefault(slot, [0, 0])
            cur[0] += nbytes
            cur[1] += ranks
        return out

    def is_empty(self) -> bool:
        return not (self.stored or self.failed_slots or self.unloaded_tokens)
