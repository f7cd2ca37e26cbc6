"""The KV cache: one pool of fixed-size pages that sequences share, and that remembers prefixes.

Pages. The pool holds `num_pages` pages of `page_size` (B) positions. The layers are split into groups
of equal size g, each group all full-attention or all sliding (vLLM's hybrid layout): gpt-oss's 12
full and 12 sliding layers are two groups of 12. A page belongs to one group at a time and holds the
keys and values of its g layers for B consecutive positions of one sequence, so every page has the
same size and one byte budget serves both kinds of layer.

Sequences. A sequence holds, per group, a table of pages by block (block j = positions jB .. jB + B - 1).
Full groups keep every block. A sliding layer's query at position q sees keys q - window + 1 .. q, so
before each forward pass a sliding group gives back the blocks that lie wholly before the window of the
pass's first query: it holds at most `ceil((window - 1 + chunk) / B) + 1` pages, whatever its length.

Prefixes. A block whose B positions have all been computed is registered under a hash of its tokens
and of all tokens before it. A page that no sequence holds any more keeps its contents and stays
registered, evictable, least recently released first (a finished sequence queues its blocks from the
last to the first), until its memory is needed. A new sequence
whose tokens begin with registered blocks takes their pages and computes only the rest
(`Sequence.reuse_prefix`). Shared pages are never written again: only whole blocks are registered, and
a sequence writes only past its last whole block. Sliding groups need the window before the reuse
point p too (blocks from (p - window + 1) // B on): their pages were given back when the first sequence
moved past them and stay registered like the others; the longest prefix for which every group still
has its pages is the one reused. So reuse is exact: every key that a query after p can see is the
key the whole computation writes.

A forward pass goes through a `PagedBatch` (`KVCache.batch`): its sequences each take the same number
of new tokens; the pass writes their keys and values into the pages and reads back, per layer, each
sequence's visible pages gathered into [rows, keys, Hkv, D] with their positions (-1 for empty slots).
"""

from __future__ import annotations

import collections
import hashlib
import math
import mmap
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from gptoss.errors import GptossError
from gptoss.model.config import ModelConfig

# Prompts are prefilled in chunks of this many tokens. A chunk decodes each MXFP4 expert weight it routes
# to once for all its tokens, so bigger chunks amortise that decoding (llama.cpp's default micro-batch is
# 512 as well); a sliding group holds pages for window - 1 + chunk positions.
PREFILL_CHUNK = 512
# Positions per page: the unit of allocation and of prefix reuse (a reused prefix ends on a page boundary).
PAGE_SIZE = 32
NO_PAGE = -1  # a sliding group's block that was given back


class ContextError(GptossError):
    """More tokens than the model's context or the cache can hold."""


class CacheFull(ContextError):
    """No free page left: every page is held by a running sequence."""


@dataclass(frozen=True)
class LayerGroup:
    sliding: bool
    layers: tuple[int, ...]


def layer_groups(cfg: ModelConfig) -> list[LayerGroup]:
    """The layers in groups of equal size, each of one kind: full groups first, then sliding ones."""
    full = [i for i in range(cfg.num_layers) if not cfg.is_sliding(i)]
    sliding = [i for i in range(cfg.num_layers) if cfg.is_sliding(i)]
    size = math.gcd(len(full), len(sliding))
    return [LayerGroup(kind, tuple(layers[j:j + size])) for kind, layers in ((False, full), (True, sliding))
            for j in range(0, len(layers), size)]


def _blocks_held(cfg: ModelConfig, tokens: int, page_size: int, chunk: int) -> tuple[int, int]:
    """(pages of a full group, pages of a sliding group) that one sequence of `tokens` tokens holds at most."""
    blocks = -(-tokens // page_size)
    return blocks, min(blocks, -(-(cfg.sliding_window - 1 + chunk) // page_size) + 1)


def pages_per_sequence(cfg: ModelConfig, tokens: int, page_size: int = PAGE_SIZE, chunk: int = PREFILL_CHUNK) -> int:
    """The most pages one sequence of `tokens` tokens holds at once, written `chunk` tokens at a time."""
    full, sliding = _blocks_held(cfg, tokens, page_size, chunk)
    return sum(sliding if g.sliding else full for g in layer_groups(cfg))


def page_bytes(cfg: ModelConfig, page_size: int = PAGE_SIZE, dtype_bytes: int = 2) -> int:
    """Bytes of one page: keys and values of one group's layers for `page_size` positions."""
    return 2 * len(layer_groups(cfg)[0].layers) * page_size * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


def allocated_kv_bytes(cfg: ModelConfig, context: int, batch: int = 1, chunk: int = PREFILL_CHUNK,
                       page_size: int = PAGE_SIZE, dtype_bytes: int = 2) -> dict:
    """The K and V bytes the pages of `batch` sequences of `context` tokens take, per layer kind and in total
    (sliding layers: the pages of window - 1 + chunk positions; `gptoss.analysis.compare.windowed_kv_bytes`
    is the textbook figure, exactly the window)."""
    per_page, groups = page_bytes(cfg, page_size, dtype_bytes), layer_groups(cfg)
    full_pages, sliding_pages = _blocks_held(cfg, context, page_size, chunk)
    full = sum(not g.sliding for g in groups) * full_pages * per_page * batch
    sliding = sum(g.sliding for g in groups) * sliding_pages * per_page * batch
    return {"full_layers": full, "sliding_layers": sliding, "total": full + sliding}


def _block_hash(previous: bytes, tokens: Seq[int]) -> bytes:
    """A block's key: its tokens and, through `previous`, every token before it (sha256, so that a
    crafted prompt cannot collide with another user's)."""
    return hashlib.sha256(previous + b"".join(t.to_bytes(4, "little") for t in tokens)).digest()


class KVCache:
    """The page pool. `sequence()` starts a sequence in it, `batch()` makes the cache of one forward pass."""

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int = PAGE_SIZE, chunk: int = PREFILL_CHUNK,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", prefix_reuse: bool = True,
                 kv_heads: int | None = None):
        """kv_heads: the KV heads whose keys and values the pages hold (default all; a rank of a split
        model, `Transformer.kv_heads`, caches only its own)."""
        if num_pages < 1 or page_size < 1:
            raise ContextError(f"a KV cache needs at least one page of at least one position, got {num_pages} "
                               f"pages of {page_size}")
        self.cfg, self.num_pages, self.page_size, self.chunk = cfg, num_pages, page_size, chunk
        self.prefix_reuse = prefix_reuse
        self.groups = layer_groups(cfg)
        self.group_of_layer = {layer: (g, i) for g, group in enumerate(self.groups) for i, layer in enumerate(group.layers)}
        size = len(self.groups[0].layers)
        # [layer within its group, page, slot, Hkv, D]; the last page is the null page, which pads
        # gathered rows and is never allocated.
        shape = (size, num_pages + 1, page_size, kv_heads or cfg.num_kv_heads, cfg.head_dim)
        self.keys, self.values = _zeros_on_demand(shape, dtype, device), _zeros_on_demand(shape, dtype, device)
        self.positions = torch.full((num_pages + 1, page_size), -1, dtype=torch.long, device=device)
        self.null_page = num_pages
        self.holders = [0] * num_pages                      # sequences holding each page
        self.empty = list(range(num_pages - 1, -1, -1))     # pages with nothing worth keeping
        self.cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # registered, held by none; LRU first
        self.registry: dict[tuple[int, bytes], int] = {}    # (group, block hash) -> page
        self.key_of_page: dict[int, tuple[int, bytes]] = {}

    @classmethod
    def for_tokens(cls, cfg: ModelConfig, tokens: int, sequences: int = 1, **kwargs) -> "KVCache":
        """A pool with room for `sequences` sequences of `tokens` tokens each."""
        page_size, chunk = kwargs.get("page_size", PAGE_SIZE), kwargs.get("chunk", PREFILL_CHUNK)
        return cls(cfg, sequences * pages_per_sequence(cfg, tokens, page_size, chunk), **kwargs)

    @classmethod
    def for_bytes(cls, cfg: ModelConfig, nbytes: int, dtype: torch.dtype = torch.bfloat16, **kwargs) -> "KVCache":
        """A pool of as many pages as `nbytes` holds."""
        per_page = page_bytes(cfg, kwargs.get("page_size", PAGE_SIZE), dtype.itemsize)
        return cls(cfg, nbytes // per_page, dtype=dtype, **kwargs)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def free_pages(self) -> int:
        """Pages a new allocation can take: empty ones, and registered ones nobody holds (evicted if taken)."""
        return len(self.empty) + len(self.cached)

    def max_tokens(self) -> int:
        """The longest sequence that fits the whole pool."""
        low, high = 0, self.num_pages * self.page_size
        while low < high:
            mid = (low + high + 1) // 2
            if pages_per_sequence(self.cfg, mid, self.page_size, self.chunk) <= self.num_pages:
                low = mid
            else:
                high = mid - 1
        return low

    def first_visible_block(self, position: int) -> int:
        """The first block a sliding layer's query at `position` sees (its window starts there)."""
        return max(0, position - self.cfg.sliding_window + 1) // self.page_size

    def cached_prefix(self, tokens: Seq[int]) -> list[bytes]:
        """The block hashes of the longest whole-block prefix of `tokens` whose pages are all registered
        (every group's, sliding groups' for the window before its end), leaving at least the last token
        to compute, for its logits."""
        if not self.prefix_reuse:
            return []
        B = self.page_size
        hashes, previous = [], b""
        for j in range((len(tokens) - 1) // B):
            previous = _block_hash(previous, tokens[j * B:(j + 1) * B])
            if not all((g, previous) in self.registry for g, group in enumerate(self.groups) if not group.sliding):
                break
            hashes.append(previous)
        sliding = [g for g, group in enumerate(self.groups) if group.sliding]
        while hashes and not all((g, hashes[j]) in self.registry for g in sliding
                                 for j in range(self.first_visible_block(len(hashes) * B), len(hashes))):
            hashes.pop()
        return hashes

    def sequence(self) -> "Sequence":
        return Sequence(self)

    def batch(self, sequences: list["Sequence"], tokens: list[list[int]]) -> "PagedBatch":
        return PagedBatch(self, sequences, tokens)

    # --- pages -------------------------------------------------------------------------------------

    def _allocate(self) -> int:
        if self.empty:
            page = self.empty.pop()
        elif self.cached:
            page, _ = self.cached.popitem(last=False)        # the least recently released
            del self.registry[self.key_of_page.pop(page)]
        else:
            raise CacheFull(f"all {self.num_pages} pages of the KV cache are in use")
        self.positions[page] = -1
        self.holders[page] = 1
        return page

    def _hold(self, page: int) -> None:
        if self.holders[page] == 0:
            del self.cached[page]
        self.holders[page] += 1

    def _release(self, page: int) -> None:
        self.holders[page] -= 1
        if self.holders[page] == 0:
            if page in self.key_of_page:
                self.cached[page] = None
            else:
                self.empty.append(page)

    def _copy(self, page: int, slots: int) -> int:
        """A new page holding the first `slots` positions of `page` (all layers of its group); `page` is given
        back."""
        copy = self._allocate()
        for pool in (self.keys, self.values):
            pool[:, copy, :slots] = pool[:, page, :slots]
        self.positions[copy, :slots] = self.positions[page, :slots]
        self._release(page)
        return copy

    def _register(self, group: int, key: bytes, page: int) -> None:
        if self.prefix_reuse and (group, key) not in self.registry and page not in self.key_of_page:
            self.registry[group, key] = page
            self.key_of_page[page] = (group, key)


class Sequence:
    """One sequence's pages in the pool: `tokens` are the tokens whose keys and values are in it."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.tokens: list[int] = []
        self.tables: list[list[int]] = [[] for _ in cache.groups]   # page per block, per group
        self.hashes: list[bytes] = []                                # key of each whole block

    @property
    def length(self) -> int:
        return len(self.tokens)

    def held_pages(self) -> int:
        return sum(page != NO_PAGE for table in self.tables for page in table)

    def reuse_prefix(self, tokens: Seq[int]) -> int:
        """Takes the registered pages of the longest prefix of `tokens` the cache holds (`KVCache.cached_prefix`);
        returns the number of tokens reused. Only for a new sequence."""
        assert not self.tokens, "reuse_prefix starts a sequence"
        c = self.cache
        hashes = c.cached_prefix(tokens)
        B, blocks = c.page_size, len(hashes)
        for g, group in enumerate(c.groups):
            first = c.first_visible_block(blocks * B) if group.sliding else 0
            self.tables[g] = [NO_PAGE] * first
            for j in range(first, blocks):
                page = c.registry[g, hashes[j]]
                c._hold(page)
                self.tables[g].append(page)
        self.tokens, self.hashes = list(tokens[:blocks * B]), hashes
        return blocks * B

    def pages_to_grow(self, tokens: int) -> int:
        """Pages this sequence still has to take to reach `tokens` tokens (at most; for admission)."""
        return max(0, pages_per_sequence(self.cache.cfg, tokens, self.cache.page_size, self.cache.chunk)
                   - self.held_pages())

    def _prepare(self, count: int) -> None:
        """Before a pass that adds `count` tokens: sliding groups give back the blocks no query of the pass
        can see, then every group takes the pages the new positions need (CacheFull if none is left)."""
        c, start = self.cache, self.length
        first_visible = c.first_visible_block(start)
        last = (start + count - 1) // c.page_size
        for table, group in zip(self.tables, c.groups):
            if group.sliding:
                for j in range(min(first_visible, len(table))):
                    if table[j] != NO_PAGE:
                        c._release(table[j])
                        table[j] = NO_PAGE
            while len(table) <= last:
                table.append(c._allocate())

    def _commit(self, tokens: list[int]) -> None:
        """After a pass wrote `tokens`: they are in the cache; register the blocks they completed."""
        c, B = self.cache, self.cache.page_size
        self.tokens.extend(tokens)
        while len(self.hashes) < len(self.tokens) // B:
            j = len(self.hashes)
            self.hashes.append(_block_hash(self.hashes[-1] if self.hashes else b"", self.tokens[j * B:(j + 1) * B]))
            for g, table in enumerate(self.tables):
                if table[j] != NO_PAGE:  # always so: a block just completed lies in every group's window
                    c._register(g, self.hashes[j], table[j])

    def truncate(self, length: int) -> None:
        """Forgets the tokens from `length` on (a speculative draft that was not accepted). Blocks wholly past
        `length` are given back (registered ones stay cached: they hold what those tokens computed). The
        block `length` ends inside is written again by the next pass, so if it is registered or shared it is
        first copied to a page of this sequence's own: a registered page is never written again."""
        c, B = self.cache, self.cache.page_size
        kept, inside = -(-length // B), length // B   # blocks holding kept positions; the one `length` ends in
        if not 0 < length <= self.length or any(     # a sliding group must still hold the window before `length`
                table[j] == NO_PAGE for table, group in zip(self.tables, c.groups) if group.sliding
                for j in range(c.first_visible_block(length - 1), min(kept, len(table)))):
            raise ValueError(f"cannot truncate a sequence of {self.length} tokens to {length}")
        copies = [g for g, table in enumerate(self.tables) if length % B and inside < len(table)
                  and table[inside] != NO_PAGE and (table[inside] in c.key_of_page or c.holders[table[inside]] > 1)]
        if len(copies) > c.free_pages:  # before anything changes
            raise CacheFull(f"truncating needs {len(copies)} free pages of the KV cache, {c.free_pages} are left")
        self.tokens, self.hashes = self.tokens[:length], self.hashes[:length // B]
        for g, table in enumerate(self.tables):
            for page in table[kept:]:
                if page != NO_PAGE:
                    c._release(page)
            del table[kept:]
            if g in copies:
                table[inside] = c._copy(table[inside], length % B)

    def release(self) -> None:
        """Gives back every page. Registered pages stay in the pool for later prefixes, queued for eviction
        block by block from the last: a prefix's tail goes before its head, and the sliding pages a block
        gave back earlier are queued with the block's full pages again (so the window before any reuse
        point lasts as long as the point itself). The sequence is empty afterwards."""
        c = self.cache
        for j in reversed(range(max(map(len, self.tables)))):
            for g, table in enumerate(self.tables):
                if j < len(table) and table[j] != NO_PAGE:
                    c._release(table[j])
                elif j < len(self.hashes) and (page := c.registry.get((g, self.hashes[j]))) in c.cached:
                    c.cached.move_to_end(page)
        self.tokens, self.hashes = [], []
        self.tables = [[] for _ in c.groups]


class PagedBatch:
    """The cache of one forward pass: row r feeds `tokens[r]` (the same count for every row) to
    `sequences[r]`. Made before the pass (it takes the pages, so CacheFull comes before any compute)."""

    def __init__(self, cache: KVCache, sequences: list[Sequence], tokens: list[list[int]]):
        count = len(tokens[0])
        if any(len(t) != count for t in tokens) or len(tokens) != len(sequences) or count == 0:
            raise ValueError("every sequence of a batch takes the same number of new tokens, at least one")
        if count > cache.chunk:
            raise ValueError(f"{count} tokens at once exceed the cache's chunk of {cache.chunk}")
        for s in sequences:
            if s.length + count > cache.cfg.max_context:
                raise ContextError(f"position {s.length + count - 1} is past the model's context of "
                                   f"{cache.cfg.max_context} tokens")
            s._prepare(count)
        self.cache, self.sequences, self.tokens = cache, sequences, tokens
        device, B = cache.positions.device, cache.page_size
        starts = torch.tensor([s.length for s in sequences], device=device)
        self.positions = starts[:, None] + torch.arange(count, device=device)          # [R, T]
        self.writes, self.reads, self.key_positions = [], [], None
        for g in range(len(cache.groups)):
            # Where each new token goes: slot page * B + offset of the flattened pool.
            table = torch.tensor(_padded([s.tables[g] for s in sequences], cache.null_page), device=device)
            self.writes.append((table.gather(1, self.positions // B) * B + self.positions % B).view(-1))
            # What each row reads: the slots of its pages (a sliding group's given-back blocks left out),
            # rows padded with the null page.
            pages = torch.tensor(_padded([[p for p in s.tables[g] if p != NO_PAGE] for s in sequences], cache.null_page),
                                 device=device)
            self.reads.append((pages[..., None] * B + torch.arange(B, device=device)).view(len(sequences), -1))
        self.last_layer = cache.cfg.num_layers - 1

    @classmethod
    def replay(cls, cache: KVCache, plan: dict) -> "PagedBatch":
        """The pass that `plan()` describes, on another rank's pool of the same pages (which holds that rank's
        KV heads and keeps no tables of its own): the same slots written and read."""
        batch = cls.__new__(cls)
        batch.cache, batch.sequences, batch.tokens = cache, [], []
        batch.positions, batch.writes = plan["positions"], plan["writes"]
        batch.reads, batch.key_positions = plan["reads"], plan["key_positions"]
        batch.last_layer = cache.cfg.num_layers - 1
        return batch

    def plan(self) -> dict:
        """What the pass does to the pool, as tensors (after `begin`): positions [R, T], and per group the
        slots written [R * T], the slots read [R, S] and their positions [R, S]."""
        return {"positions": self.positions, "writes": self.writes, "reads": self.reads,
                "key_positions": self.key_positions}

    def next_positions(self, num_tokens: int) -> torch.Tensor:
        if num_tokens != self.positions.shape[1]:
            raise ValueError(f"the batch was made for {self.positions.shape[1]} new tokens, not {num_tokens}")
        return self.positions

    def begin(self, positions: torch.Tensor) -> None:
        """Called before the forward with the new tokens' positions [R, T] (again by the forward: once
        suffices)."""
        if not torch.equal(positions, self.positions):
            raise ValueError("positions do not continue the batch's sequences")
        if self.key_positions is not None:
            return
        flat, self.key_positions = self.cache.positions.view(-1), []
        for writes, reads in zip(self.writes, self.reads):
            flat[writes] = self.positions.reshape(-1)
            self.key_positions.append(flat[reads])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v [R, T, Hkv, D] of `layer`; returns its visible keys, values [R, S, Hkv, D] and their
        positions [R, S] (-1: an empty slot or padding)."""
        c = self.cache
        g, i = c.group_of_layer[layer]
        R, S = self.reads[g].shape
        out = []
        for pool, new in ((c.keys[i], k), (c.values[i], v)):
            flat = pool.view(-1, *pool.shape[2:])                    # [(pages + 1) * B, Hkv, D]
            flat.index_copy_(0, self.writes[g], new.reshape(-1, *new.shape[2:]).to(flat.dtype))
            out.append(flat.index_select(0, self.reads[g].view(-1)).view(R, S, *flat.shape[1:]))
        if layer == self.last_layer:  # every layer has written: the tokens are in the cache
            for s, tokens in zip(self.sequences, self.tokens):
                s._commit(tokens)
        return out[0], out[1], self.key_positions[g]


def _zeros_on_demand(shape: tuple[int, ...], dtype: torch.dtype, device: str | torch.device) -> torch.Tensor:
    """Zeros that take memory only where written: on the CPU an anonymous mapping, whose pages the OS
    hands out (zeroed) on first write, so the unused part of a large pool costs no RSS."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)[:nbytes].view(dtype).view(shape)


def _padded(rows: list[list[int]], fill: int) -> list[list[int]]:
    width = max(len(r) for r in rows)
    return [r + [fill] * (width - len(r)) for r in rows]
