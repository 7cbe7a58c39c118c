"""One replica's pool of KV-cache blocks, with the prefix cache on top.

The scheduler owns the block ids; the worker only holds the tensors they index.
A block is *owned* while some sequence's table holds it (``ref_count`` counts the
tables) and *free* otherwise. Freed blocks keep their prefix-cache hash and go to
the back of an LRU queue, so a later request with the same prefix can take them
back (lazy eviction); a hash leaves the index only when its block is reused.

Every change to the index can be reported to one ``listener`` (the prefix-cache
event publisher, ``scheduler_svc.kv_events``): a block stored under its hash, and a
hash removed when its block is taken for new content. Nobody listens by default, and
then the hot path pays one attribute check per indexed or evicted block, nothing more.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from scheduler_svc.block_hash import ROOT_PARENT, hash_block

_NO_BLOCKS: list[int] = []

# Kinds of index change a listener hears about.
BLOCK_STORED = 1
BLOCK_REMOVED = 2

BlockListener = Callable[[int, bytes, bytes, tuple[int, ...]], None]
"""``listener(kind, block_hash, parent_hash, token_ids)``: ``BLOCK_STORED`` with the
parent's hash (``b""`` for a sequence's first block) and the block's token ids, or
``BLOCK_REMOVED`` with ``b""`` and ``()``. Called synchronously, inside the change."""


@dataclass(frozen=True, slots=True)
class CachedBlock:
    """What a hashed block holds: enough to recompute its hash and to publish it."""

    parent: bytes
    token_ids: tuple[int, ...]
    extra: bytes


class BlockManager:
    """Allocation, sharing and lazy eviction of one replica's ``num_blocks`` blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        # Free blocks, least recently freed first: allocation takes from the front.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # Prefix index: hash -> block, and each hashed block's content.
        self._cached: dict[bytes, int] = {}
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._content: dict[int, CachedBlock] = {}
        # Per sequence: its block table, and how many leading blocks are hashed or were hits.
        self.tables: dict[int, list[int]] = {}
        self._num_hashed: dict[int, int] = {}
        self.queries = 0
        self.hits = 0
        # Told of every index change while set; the index is already changed when it is called.
        self.listener: BlockListener | None = None

    # -- reading ---------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Owned blocks over all blocks (cached but free blocks count as free)."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    def cached_blocks(self) -> dict[bytes, CachedBlock]:
        """The prefix index: every hash with the content of its block."""
        return {h: self._content[b] for h, b in self._cached.items()}

    def lookup(self, block_hashes: list[bytes], num_tokens: int) -> list[int]:
        """Blocks holding the longest cached prefix of a sequence of ``num_tokens`` tokens.

        At least one token is always left to compute: the model must run on the
        last token to produce the next one.
        """
        if not self.enable_prefix_caching:
            return _NO_BLOCKS
        hits = []
        cached = self._cached
        for h in block_hashes[: (num_tokens - 1) // self.block_size]:
            block = cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # -- changing --------------------------------------------------------------

    def admit(
        self, seq_id: int, hits: list[int], num_tokens: int, num_queried: int
    ) -> list[int] | None:
        """Start a table: the ``hits`` from :meth:`lookup`, then fresh blocks up to ``num_tokens``.

        Returns the table, or None (changing nothing) when the pool is too small.
        ``num_queried`` is how many blocks the lookup could have hit, for the hit rate.
        """
        need = -(-num_tokens // self.block_size) - len(hits)
        ref_counts = self.ref_counts
        hits_now_free = sum(1 for b in hits if ref_counts[b] == 0)
        if need > len(self._free) - hits_now_free:
            return None
        for b in hits:
            if ref_counts[b] == 0:
                del self._free[b]
            ref_counts[b] += 1
        table = list(hits)
        table.extend(self._take_free() for _ in range(need))
        self.tables[seq_id] = table
        self._num_hashed[seq_id] = len(hits)
        if self.enable_prefix_caching:
            self.queries += num_queried
            self.hits += len(hits)
        return table

    def grow(self, seq_id: int, num_tokens: int) -> list[int] | None:
        """Extend a table to cover ``num_tokens``: the new blocks, or None when they do not fit."""
        table = self.tables[seq_id]
        need = -(-num_tokens // self.block_size) - len(table)
        if need <= 0:
            return _NO_BLOCKS
        if need > len(self._free):
            return None
        new = [self._take_free() for _ in range(need)]
        table.extend(new)
        return new

    def register(
        self,
        seq_id: int,
        block_hashes: list[bytes],
        token_ids: list[int],
        num_tokens: int,
        extra: bytes,
    ) -> None:
        """Put the blocks filled by the first ``num_tokens`` tokens into the prefix index.

        Called when the step that fills them is scheduled, so sequences admitted in
        the same step already share them (the worker writes a step's KV before any
        attention of that step reads it). A hash already indexed under another block
        is left there; this block then stays private.
        """
        full = num_tokens // self.block_size
        start = self._num_hashed[seq_id]
        if full <= start or not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        bs = self.block_size
        listener = self.listener
        for i in range(start, full):
            h = block_hashes[i]
            block = table[i]
            if h in self._cached or self._block_hash[block] is not None:
                continue
            self._cached[h] = block
            self._block_hash[block] = h
            parent = block_hashes[i - 1] if i else ROOT_PARENT
            content = self._content[block] = CachedBlock(
                parent, tuple(token_ids[i * bs : (i + 1) * bs]), extra
            )
            if listener is not None:
                listener(BLOCK_STORED, h, parent if i else b"", content.token_ids)
        self._num_hashed[seq_id] = full

    def free(self, seq_id: int) -> None:
        """Release a sequence's table, last block first, so its prefix is evicted last."""
        table = self.tables.pop(seq_id)
        del self._num_hashed[seq_id]
        ref_counts = self.ref_counts
        free = self._free
        for b in reversed(table):
            ref_counts[b] -= 1
            if ref_counts[b] == 0:
                free[b] = None

    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        h = self._block_hash[block]
        if h is not None:
            del self._cached[h]
            del self._content[block]
            self._block_hash[block] = None
            if self.listener is not None:
                self.listener(BLOCK_REMOVED, h, b"", ())
        self.ref_counts[block] = 1
        return block

    # -- checking --------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError unless the pool is consistent (used by tests)."""
        owners = Counter(b for table in self.tables.values() for b in table)
        for seq_id, table in self.tables.items():
            assert len(set(table)) == len(table), f"seq {seq_id} holds a block twice: {table}"
            assert self._num_hashed[seq_id] <= len(table), f"seq {seq_id} hashed past its table"
        assert self.tables.keys() == self._num_hashed.keys()
        for b in range(self.num_blocks):
            assert self.ref_counts[b] == owners[b], (
                f"block {b}: ref {self.ref_counts[b]} != owners {owners[b]}"
            )
            assert (b in self._free) == (owners[b] == 0), (
                f"block {b} is both free and owned, or neither"
            )
        used = sum(1 for rc in self.ref_counts if rc > 0)
        assert len(self._free) + used == self.num_blocks
        for h, b in self._cached.items():
            assert self._block_hash[b] == h, (
                f"index points {h.hex()[:8]} at block {b} holding another hash"
            )
            c = self._content[b]
            assert len(c.token_ids) == self.block_size
            assert hash_block(c.parent, c.token_ids, c.extra) == h, (
                f"block {b}: content does not match its hash"
            )
        hashed = {b for b, h in enumerate(self._block_hash) if h is not None}
        assert hashed == set(self._cached.values()) == self._content.keys()

    def check_sequence(self, seq_id: int, block_hashes: list[bytes], token_ids: list[int]) -> None:
        """Raise AssertionError unless each hashed block in the table holds these tokens."""
        table = self.tables[seq_id]
        bs = self.block_size
        for i in range(self._num_hashed[seq_id]):
            h = self._block_hash[table[i]]
            if h is None:
                continue
            assert h == block_hashes[i], f"seq {seq_id} block {i} is indexed under another prefix"
            content = self._content[table[i]].token_ids
            assert list(content) == token_ids[i * bs : (i + 1) * bs], (
                f"seq {seq_id} block {i} holds other tokens"
            )
