"""Row extents (pure Python): the allocator's best fit and coalescing, and randomized replays
that no row is handed out twice and the budget holds, through the allocator and the index."""

from __future__ import annotations

import random

import pytest
from scheduler_helpers import BLOCK_BYTES, BS, Engine, FakeRequest, doc, make_index

from polykv_vllm.connector.scheduler import RowAllocator
from polykv_vllm.connector.slab import runs


def spans(rows: list[int]) -> list[tuple[int, int]]:
    return [(r.row, r.length) for r in runs(rows)]


def check(alloc: RowAllocator, used: set[int]) -> None:
    """Free extents and used rows partition the rows; extents are maximal (coalesced)."""
    free: set[int] = set()
    ends = set()
    for start, length in alloc.extents:
        assert length >= 1 and start not in ends, "two free extents touch: not coalesced"
        block = set(range(start, start + length))
        assert not block & free and not block & used
        free |= block
        ends.add(start + length)
    assert free | used == set(range(alloc.capacity))
    assert alloc.free_rows == len(free)


def test_best_fit_coalescing_and_continuation() -> None:
    rows = RowAllocator(10)
    assert [spans(rows.alloc(n)) for n in (3, 3, 4)] == [[(0, 3)], [(3, 3)], [(6, 4)]]
    for row in (5, 4, 1, 0, 8):  # out of order: 0-1 and 4-5 coalesce
        rows.free(row)
    assert rows.extents == [(0, 2), (4, 2), (8, 1)]
    assert rows.alloc(1) == [8], "best fit: the smallest extent that holds it"
    for row in (8, 9, 7, 6):  # 6-7 join 4-5 and 8-9 into one extent
        rows.free(row)
    assert rows.extents == [(0, 2), (4, 6)]
    assert spans(rows.alloc(3)) == [(4, 3)], "the only extent that holds 3"
    assert spans(rows.alloc(2)) == [(0, 2)]
    rows.free(3)
    assert spans(rows.alloc(4)) == [(3, 1), (7, 3)], "none holds 4: the largest, then the rest"
    assert rows.free_rows == 0
    with pytest.raises(AssertionError):
        rows.alloc(1)
    with pytest.raises(AssertionError):
        RowAllocator(4).free(2)  # never handed out
    for row in (2, 3, 7):
        rows.free(row)
    with pytest.raises(AssertionError):
        rows.free(3)  # twice
    # the block before the new ones sits in row 1: continue at 2-3, then the rest by best fit
    assert rows.alloc(3, after=1) == [2, 3, 7]
    rows.free(8)
    assert rows.alloc(1, after=0) == [8], "row 1 is in use: no continuation, best fit"


@pytest.mark.parametrize("seed", range(8))
def test_random_alloc_and_free_never_hand_a_row_out_twice(seed: int) -> None:
    """Random allocations and frees against a reference set: rows unique and free before, the
    extents a partition, and one run whenever one free extent could hold the whole request (the
    fewest runs the extents allow otherwise)."""
    rng = random.Random(seed)
    cap = rng.choice([1, 7, 64, 300])
    alloc = RowAllocator(cap)
    used: set[int] = set()
    for _ in range(600):
        if used and (rng.random() < 0.5 or alloc.free_rows == 0):
            for row in rng.sample(sorted(used), rng.randint(1, min(len(used), 12))):
                alloc.free(row)
                used.remove(row)
        else:
            n = rng.randint(1, max(1, min(alloc.free_rows, 40)))
            lengths = sorted((length for _, length in alloc.extents), reverse=True)
            fewest = next(i + 1 for i in range(len(lengths)) if sum(lengths[: i + 1]) >= n)
            after = rng.choice([None, *used]) if used and rng.random() < 0.3 else None
            got = alloc.alloc(n, after)
            assert len(got) == n == len(set(got)) and not set(got) & used
            if after is None:
                assert len(runs(got)) == fewest
            used |= set(got)
        check(alloc, used)


def fewest_runs(free: set[int], n: int) -> int:
    """The fewest runs of consecutive rows of ``free`` that hold ``n`` rows."""
    lengths = sorted((r.length for r in runs(sorted(free))), reverse=True)
    return next(i + 1 for i in range(len(lengths)) if sum(lengths[: i + 1]) >= n)


@pytest.mark.parametrize("seed", range(4))
def test_index_places_each_store_in_the_fewest_runs_under_eviction(seed: int) -> None:
    """The real index storing documents in random order through a small store (most stores
    evict): the fake worker asserts no store lands in a row that holds a block; the budget
    holds; each store takes the fewest runs the free rows (its victims' included) allow, or
    one more when it continues right after the block before it."""
    rng = random.Random(seed)
    budget = 40
    index = make_index(budget)
    engine = Engine(index)
    docs = [doc(100 + d, rng.choice([3, 5.5, 9, 14])) for d in range(9)]
    for t in range(150):
        req = FakeRequest(f"r{t}", docs[rng.randrange(len(docs))] + [t + 1] * (2 * BS + 3))
        free = {r for s, n in index.entries.rows.extents for r in range(s, s + n)}
        engine.admit(req)
        plan = engine.step([req])
        index.finish(req)
        assert index.used_bytes <= index.budget_bytes
        placed = [e.row for e in index.entries.values()]
        assert len(set(placed)) == len(placed) and min(placed, default=0) >= 0
        assert index.entries.rows.free_rows == budget - index.used_bytes // BLOCK_BYTES
        for job in plan.stores:
            fewest = fewest_runs(free | set(plan.freed_rows), len(job.rows))
            assert len(runs(list(job.rows))) <= fewest + 1, (job.rows, fewest)
