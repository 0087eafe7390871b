"""The batch KV store: one row per resident sequence, written in place, read by HF attention."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kernel.llm.engine import ragged
from kernel.llm.engine.ragged import Ragged

# Column capacity grows in steps of this many tokens, so sequences growing one token per step
# reallocate rarely.
_COLUMN_STEP = 128
# A store mostly empty for this long gives memory back; sooner it keeps its buffer. Agents in a
# closed loop empty and refill it every turn, and each new buffer is fresh pages the OS must
# fault in and zero: shrinking at once cost 64 agents ~21 reallocations (1.6 GB) and ~400k
# page faults a 2-turn run.
HOLD_S = 2.0


class SlotLayer(DynamicLayer):
    """One decoder layer's face of the store, in the shape transformers' attention expects."""

    def __init__(self, store: SlotCache, index: int) -> None:
        super().__init__()
        self._store = store
        self._index = index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._store.write(self._index, key_states, value_states)

    def get_seq_length(self) -> int:
        binding = self._store.binding
        return 0 if binding is None else binding.columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("slot rows are managed by the engine")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("slot rows are managed by the engine")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("slot rows are managed by the engine")


class SlotCache(Cache):
    """KV of all resident sequences in one tensor [layers, 2, rows, kv_heads, columns, head_dim].

    A sequence owns one row; its token t sits at column t, so rows are right-padded to the
    longest one and a step appends each row's new token at that row's own length: nothing is
    shifted or concatenated as sequences join, grow and leave (DynamicCache would copy every
    row's whole history at every step). Occupied rows are kept dense at the front; a forward
    pass covers one contiguous range of rows, which `arrange` sets up by swapping rows.
    Columns past a row's length hold stale but finite values, so masked attention ignores them.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(layers=[SlotLayer(self, i) for i in range(layers)])
        self._dims = (layers, kv_heads, head_dim)
        self.dtype = dtype
        self.device = device
        self._buf = self._alloc(0, 0)
        self._owner: list[int] = []  # row -> sequence id
        self._row: dict[int, int] = {}  # sequence id -> row
        self._length: list[int] = []  # row -> tokens of KV held
        self._low_since: float | None = None  # since when the store could shrink
        self.binding: Ragged | None = None

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def token_bytes(self) -> int:
        """Bytes of KV one token takes across all layers."""
        layers, kv_heads, head_dim = self._dims
        return layers * 2 * kv_heads * head_dim * self._buf.element_size()

    @property
    def reserved_bytes(self) -> int:
        return self._buf.numel() * self._buf.element_size()

    @property
    def used_tokens(self) -> int:
        return sum(self._length)

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._row

    def __len__(self) -> int:
        return len(self._owner)

    def length(self, seq_id: int) -> int:
        return self._length[self._row[seq_id]]

    def set_length(self, seq_id: int, n: int) -> None:
        self._length[self._row[seq_id]] = n

    def row(self, seq_id: int) -> int:
        return self._row[seq_id]

    # -- rows -------------------------------------------------------------------------------

    def add(self, seq_id: int) -> None:
        """Give the sequence an empty row at the end."""
        if seq_id in self._row:
            raise ValueError(f"sequence {seq_id} already has a row")
        self._reshape(len(self._owner) + 1, self._columns)
        self._low_since = None
        self._row[seq_id] = len(self._owner)
        self._owner.append(seq_id)
        self._length.append(0)

    def remove(self, seq_id: int) -> None:
        """Free the sequence's row; the last row moves into the hole to keep rows dense."""
        row = self._row.pop(seq_id)
        last = len(self._owner) - 1
        if row != last:
            n = self._length[last]
            self._buf[:, :, row, :, :n] = self._buf[:, :, last, :, :n]
            self._owner[row], self._length[row] = self._owner[last], self._length[last]
            self._row[self._owner[row]] = row
        self._owner.pop()
        self._length.pop()
        self.trim()

    def arrange(self, groups: list[list[int]]) -> list[int]:
        """Make each group of sequences a contiguous row range, groups back to back from row 0.

        Returns each group's first row. Members already inside their range stay put; the rest
        are swapped into the holes, so a batch that did not change costs no copies.
        """
        starts, lo = [], 0
        for group in groups:
            hi = lo + len(group)
            outside = [s for s in group if not lo <= self._row[s] < hi]
            taken = {self._row[s] for s in group}
            holes = (r for r in range(lo, hi) if r not in taken)
            for seq_id, hole in zip(outside, holes, strict=False):
                self._swap(self._row[seq_id], hole)
            starts.append(lo)
            lo = hi
        return starts

    def _swap(self, a: int, b: int) -> None:
        n = max(self._length[a], self._length[b])
        held = self._buf[:, :, a, :, :n].clone()
        self._buf[:, :, a, :, :n] = self._buf[:, :, b, :, :n]
        self._buf[:, :, b, :, :n] = held
        self._owner[a], self._owner[b] = self._owner[b], self._owner[a]
        self._length[a], self._length[b] = self._length[b], self._length[a]
        self._row[self._owner[a]], self._row[self._owner[b]] = a, b

    # -- contents ---------------------------------------------------------------------------

    def read(self, seq_id: int, start: int, end: int) -> torch.Tensor:
        """A copy of the sequence's KV for tokens start..end-1: [layers, 2, kv_heads, n, dim]."""
        return self._buf[:, :, self._row[seq_id], :, start:end].clone()

    def load(self, seq_id: int, kv: torch.Tensor, at: int) -> None:
        """Write KV ([layers, 2, kv_heads, n, dim]) for tokens at..at+n-1; the row then holds
        tokens 0..at+n-1."""
        end = at + kv.shape[3]
        self.reserve(end)
        row = self._row[seq_id]
        self._buf[:, :, row, :, at:end] = kv
        self._length[row] = end

    def reserve(self, columns: int) -> None:
        """Make room for `columns` tokens in every row."""
        if columns > self._columns:
            grown = max(columns, self._columns + self._columns // 2)
            self._reshape(len(self._owner), -(-grown // _COLUMN_STEP) * _COLUMN_STEP)

    # -- the forward pass -------------------------------------------------------------------

    @contextmanager
    def bound(self, r: Ragged) -> Iterator[None]:
        """Route the model's cache writes for one ragged pass to the rows and columns it
        names; its attention reads the same tensor."""
        r.kv = self._buf
        self.binding = r
        try:
            yield
        finally:
            self.binding = None
            r.kv = None

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values ([1, kv_heads, T, dim]); the ragged attention
        reads them from the store, so they are handed back unchanged."""
        if self.binding is None:
            raise RuntimeError("SlotCache used outside an engine forward pass")
        ragged.write(self.binding, layer, keys, values)
        return keys, values

    # -- storage ----------------------------------------------------------------------------

    @property
    def _rows(self) -> int:
        return self._buf.shape[2]

    @property
    def _columns(self) -> int:
        return self._buf.shape[4]

    def _alloc(self, rows: int, columns: int) -> torch.Tensor:
        layers, kv_heads, head_dim = self._dims
        # Zeros, not empty: padding columns are multiplied by zero attention weights, and
        # uninitialised memory may hold NaN, which zero does not cancel.
        return torch.zeros(layers, 2, rows, kv_heads, columns, head_dim, dtype=self.dtype,
                           device=self.device)

    def _reshape(self, rows: int, columns: int) -> None:
        if rows <= self._rows and columns <= self._columns:
            return
        new_rows = max(rows, 2 * self._rows, 4) if rows > self._rows else self._rows
        self._move_to(new_rows, max(columns, self._columns))

    def trim(self, now: float | None = None) -> None:
        """Give memory back once the store has been mostly empty for HOLD_S (hysteresis: shrink
        at 1/4 of the rows or columns, to 1/2; all of it once empty)."""
        target = self._smaller()
        if target is None:
            self._low_since = None
            return
        now = time.monotonic() if now is None else now
        if self._low_since is None:
            self._low_since = now
        if now - self._low_since < HOLD_S:
            return
        self._low_since = None
        if target == (0, 0):
            self._buf = self._alloc(0, 0)
        else:
            self._move_to(*target)

    def _smaller(self) -> tuple[int, int] | None:
        """The shape the store would shrink to now, or None if it is not mostly empty."""
        used_rows = len(self._owner)
        if used_rows == 0:
            return (0, 0) if self._buf.numel() else None
        longest = max(self._length)
        rows = self._rows if self._rows < 4 * used_rows or self._rows <= 8 else 2 * used_rows
        columns = self._columns
        if columns > 4 * longest and columns > 2 * _COLUMN_STEP:
            columns = -(-2 * longest // _COLUMN_STEP) * _COLUMN_STEP
        return None if (rows, columns) == (self._rows, self._columns) else (rows, columns)

    def _move_to(self, rows: int, columns: int) -> None:
        new = self._alloc(rows, columns)
        n, width = len(self._owner), min(max(self._length, default=0), columns)
        if n and width:
            new[:, :, :n, :, :width] = self._buf[:, :, :n, :, :width]
        self._buf = new
