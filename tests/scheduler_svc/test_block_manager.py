import pytest

from scheduler_svc.block_hash import extend_hashes
from scheduler_svc.block_manager import BlockManager

BS = 4


def hashes(tokens: list[int]) -> list[bytes]:
    out: list[bytes] = []
    extend_hashes(out, tokens, BS)
    return out


def start(bm: BlockManager, seq_id: int, tokens: list[int]) -> list[int]:
    """Admit a whole prompt, with prefix lookup, and register its full blocks."""
    h = hashes(tokens)
    hits = bm.lookup(h, len(tokens))
    table = bm.admit(seq_id, hits, len(tokens), num_queried=(len(tokens) - 1) // BS)
    assert table is not None
    bm.register(seq_id, h, tokens, len(tokens), b"")
    bm.check_invariants()
    return table


def test_admit_grow_free_account_for_every_block():
    bm = BlockManager(num_blocks=8, block_size=BS)
    table = list(bm.admit(1, [], num_tokens=5, num_queried=0) or [])
    assert len(table) == 2
    assert bm.num_free_blocks == 6 and bm.usage == pytest.approx(2 / 8)
    assert bm.grow(1, 8) == []  # still fits in two blocks
    new = bm.grow(1, 9)
    assert new is not None and len(new) == 1 and bm.tables[1] == table + new
    bm.check_invariants()
    bm.free(1)
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants()


def test_admit_and_grow_refuse_without_changing_anything():
    bm = BlockManager(num_blocks=3, block_size=BS)
    assert bm.admit(1, [], num_tokens=4 * BS, num_queried=0) is None
    assert bm.num_free_blocks == 3 and not bm.tables
    bm.admit(1, [], num_tokens=2 * BS, num_queried=0)
    assert bm.grow(1, 4 * BS) is None
    assert len(bm.tables[1]) == 2 and bm.num_free_blocks == 1
    bm.check_invariants()


def test_shared_prefix_is_a_hit_and_is_ref_counted():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(1, 11))  # two full blocks and a partial one
    a = start(bm, 1, prompt)
    b = start(bm, 2, prompt)
    assert b[:2] == a[:2], "full prompt blocks are shared"
    assert b[2] != a[2], "the partly filled last block is each sequence's own"
    assert [bm.ref_counts[x] for x in a] == [2, 2, 1]
    assert (bm.queries, bm.hits) == (4, 2)
    bm.free(1)
    assert [bm.ref_counts[x] for x in b] == [1, 1, 1]
    bm.check_invariants()


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(1, 9))  # exactly two blocks
    start(bm, 1, prompt)
    assert len(bm.lookup(hashes(prompt), len(prompt))) == 1
    longer = prompt + [99]
    assert len(bm.lookup(hashes(longer), len(longer))) == 2


def test_freed_blocks_stay_cached_until_reused_lru_and_tail_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    prompt = list(range(1, 13))  # three full blocks
    a = start(bm, 1, prompt + [0])
    bm.free(1)
    assert bm.num_free_blocks == 4 and len(bm.cached_blocks()) == 3
    # Lazy eviction: the same prefix comes back from free blocks.
    again = bm.lookup(hashes(prompt + [0]), 13)
    assert again == a[:3]
    # Blocks were freed last-first, so the earliest never-hashed block goes first,
    # then the prefix's tail; the head of the prefix is evicted last.
    b = bm.admit(2, [], num_tokens=2 * BS, num_queried=0)
    assert b == [a[3], a[2]]
    assert bm.lookup(hashes(prompt + [0]), 13) == a[:2]
    bm.check_invariants()


def test_taking_back_a_cached_free_block_counts_against_the_pool():
    bm = BlockManager(num_blocks=3, block_size=BS)
    prompt = list(range(1, 9))
    start(bm, 1, prompt + [0])
    bm.free(1)
    hits = bm.lookup(hashes(prompt + [0]), 9)
    assert len(hits) == 2
    # Two hit blocks come out of the free pool, so only one fresh block is left.
    assert bm.admit(2, hits, num_tokens=4 * BS, num_queried=2) is None
    assert bm.admit(2, hits, num_tokens=3 * BS, num_queried=2) is not None
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_duplicate_content_keeps_the_first_block_indexed():
    bm = BlockManager(num_blocks=8, block_size=BS)
    prompt = list(range(1, 6))
    bm.admit(1, [], 5, 0)
    bm.admit(2, [], 5, 0)  # computed side by side, no hit between them
    bm.register(1, hashes(prompt), prompt, 5, b"")
    bm.register(2, hashes(prompt), prompt, 5, b"")
    assert bm.cached_blocks()[hashes(prompt)[0]].token_ids == (1, 2, 3, 4)
    assert len(bm.cached_blocks()) == 1
    bm.check_invariants()


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = list(range(1, 10))
    start(bm, 1, prompt)
    assert bm.lookup(hashes(prompt), 9) == []
    assert not bm.cached_blocks() and bm.queries == 0


def test_check_invariants_catches_corruption():
    bm = BlockManager(num_blocks=8, block_size=BS)
    start(bm, 1, list(range(1, 10)))
    bm.ref_counts[bm.tables[1][0]] += 1
    with pytest.raises(AssertionError, match="ref"):
        bm.check_invariants()
    bm.ref_counts[bm.tables[1][0]] -= 1
    bm.tables[1].append(bm.tables[1][0])
    with pytest.raises(AssertionError, match="twice"):
        bm.check_invariants()
