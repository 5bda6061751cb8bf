"""LoRA in the linear layers: which rows of a step use which adapter (`LoraStep`, built per step
by shard/batch.py and passed down `forward`), and one projection's adapters (`LoraProjection`,
built once at load).

A projection's output gains, for each row that uses adapter s, `scale_s * B_s (A_s x)`. The
adapters' matrices are stacked once per projection (every adapter's A side by side, [in, S, R],
and its B times its scale, [S, R, out]; R the largest rank there, smaller ones zero-padded, an
adapter that does not adapt this projection all zeros), so a step applies every adapter present
in a few operators whatever their number; `LoraStep.build` picks how (DENSE_CELLS). Fused
projections (qkv, gate_up) stack their parts' A and place each part's B in its own output
columns, so one matmul pair serves all parts.

Tensor parallel, exactly as the base weight is split (shard/layers/linear.py): a column-parallel
projection keeps A whole and the rows of B that match the base weight's output rows on this
rank; a row-parallel one keeps the columns of A that match the base weight's input columns and
B whole, and its delta joins the partial product before the all-reduce (the sum distributes:
sum_r B (A_r x_r) = B (A x)).

A step in which no row uses an adapter passes `None`, and the layers do nothing extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from shard.lora import LoraAdapter, LoraModule


# How a step's adapter rows meet the adapters' matrices, picked per step by `LoraStep.build`.
# The matrices are small, so a projection's LoRA cost is its operators' overhead plus reading the
# adapters' matrices once; the cheapest way is the one with the fewest operators that does not
# multiply the work much. Measured (benchmarks/lora_adapters.py: 2 Zen 3 cores, SmolLM2, rank 8
# on all seven projections, decode steps; step time relative to no adapter; the VM varies by
# ~5 % between runs): 8 adapters over 8 rows, padded 0.81x, dense 0.76x, grouped 0.78x; 2 over 32,
# dense 0.95x, padded and grouped 0.90x; 8 over 32, padded 0.86-0.91x, dense 0.80-0.82x, grouped
# 0.80x.
# - "dense": every row of the step against every adapter below S, then zero what a row does not
#   use: 3 ops, no gather, (rows x S) / (adapter rows) times the exact LoRA work. Chosen while
#   rows x S <= DENSE_CELLS and the work is at most DENSE_WASTE times the exact one.
# - "padded": each adapter's rows gathered into an [S, M] batch (M the largest group), two
#   batched matmuls: 5 ops whatever S is (3 when the rows are already in that order, one per
#   adapter). Chosen when padding adds at most PAD_SLACK of the rows.
# - "grouped": a matmul pair per adapter on its own rows: exact work, 2 ops per adapter. The rest
#   (very uneven groups: one adapter with 25 rows beside 7 with one).
DENSE_CELLS = 64
DENSE_WASTE = 2
PAD_SLACK = 0.5


@dataclass(frozen=True, slots=True)
class DenseRows:
    drop: torch.Tensor | None  # [T, S, 1] bool: row t does not use slot s; None: every row uses slot 0, S = 1


@dataclass(frozen=True, slots=True)
class PaddedRows:
    gather: torch.Tensor  # [S * M] int64: each slot's rows, then padding (row 0)
    drop: torch.Tensor | None  # [S, M, 1] bool: padding, zeroed before B (its delta is an exact 0); None: none
    per_slot: int  # M: the largest group's rows
    every_row: bool  # `gather` is every row of the step, in order: no gather, no scatter


@dataclass(frozen=True, slots=True)
class GroupedRows:
    rows: torch.Tensor  # [L] int64: every adapter row, grouped by slot (ascending), in order within a group
    groups: tuple[tuple[int, int, int], ...]  # (slot, start, stop) in `rows` of each adapter present
    every_row: bool  # `rows` is every row of the step, in order: no gather, no scatter


@dataclass(frozen=True, slots=True)
class LoraStep:
    """Which token rows of one step (flattened, as the model sees them) use which adapter, laid
    out for the strategy this step takes (see DENSE_CELLS)."""

    slots: int  # S: the highest adapter slot present + 1; projections use their first S adapters
    layout: DenseRows | PaddedRows | GroupedRows

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int, int]], num_tokens: int, device: torch.device,
              dense_cells: int = DENSE_CELLS, dense_waste: float = DENSE_WASTE,
              pad_slack: float = PAD_SLACK) -> "LoraStep | None":
        """`spans`: (adapter slot, first row, row count) of each request with an adapter; None
        when there are none (the layers then do no LoRA work). The thresholds are arguments so
        that tests and benchmarks can force each way."""
        if not spans:
            return None
        by_slot: dict[int, list[int]] = {}
        for slot, first, count in spans:
            by_slot.setdefault(slot, []).extend(range(first, first + count))
        slots = max(by_slot) + 1
        rows = [row for slot in sorted(by_slot) for row in by_slot[slot]]
        if num_tokens * slots <= min(dense_cells, dense_waste * len(rows)):
            if slots == 1 and len(rows) == num_tokens:
                return cls(1, DenseRows(None))
            drop = torch.ones(num_tokens, slots, 1, dtype=torch.bool)
            for slot, members in by_slot.items():
                drop[members, slot] = False
            return cls(slots, DenseRows(drop.to(device)))
        per_slot = max(len(members) for members in by_slot.values())
        if len(by_slot) > 1 and slots * per_slot <= (1 + pad_slack) * len(rows):
            gather = [0] * (slots * per_slot)
            drop = torch.ones(slots, per_slot, 1, dtype=torch.bool)
            for slot, members in by_slot.items():
                gather[slot * per_slot : slot * per_slot + len(members)] = members
                drop[slot, : len(members)] = False
            padding = slots * per_slot > len(rows)
            return cls(slots, PaddedRows(torch.tensor(gather).to(device), drop.to(device) if padding else None,
                                         per_slot, gather == list(range(num_tokens))))
        groups, start = [], 0
        for slot in sorted(by_slot):
            groups.append((slot, start, start + len(by_slot[slot])))
            start += len(by_slot[slot])
        every_row = rows == list(range(num_tokens))
        return cls(slots, GroupedRows(torch.tensor(rows).to(device), tuple(groups), every_row))


class LoraProjection:
    """Every loaded adapter's LoRA of one (possibly fused) projection on this rank."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        # a: [in, S, R], slot s's A transposed at a[:, s]; read whole as [in, S * R] ("dense"),
        # or per slot. b: [S, R, out], slot s's B times its scale, transposed.
        self.a = a
        self.b = b

    @classmethod
    def build(cls, slots: Sequence[Sequence[LoraModule | None]], part_sizes: Sequence[int],
              dtype: torch.dtype, device: torch.device) -> "LoraProjection | None":
        """`slots[s][p]`: adapter s's LoRA of part p (already this rank's slices), or None;
        `part_sizes`: each part's output features on this rank. None when no adapter adapts
        any part (the layer then skips LoRA entirely)."""
        present = [m for parts in slots for m in parts if m is not None]
        if not present:
            return None
        in_features = present[0].a.shape[1]
        ranks = [sum(m.a.shape[0] for m in parts if m is not None) for parts in slots]
        width, out_features = max(ranks), sum(part_sizes)
        a = torch.zeros(in_features, len(slots), width, dtype=dtype)
        b = torch.zeros(len(slots), width, out_features, dtype=dtype)
        for s, parts in enumerate(slots):
            col, row = 0, 0
            for module, size in zip(parts, part_sizes):
                if module is not None:
                    r = module.a.shape[0]
                    a[:, s, col : col + r] = module.a.t().to(dtype)
                    # The scale is folded into B in float32, before the cast: one rounding.
                    b[s, col : col + r, row : row + size] = (module.b.float() * module.scale).t().to(dtype)
                    col += r
                row += size
        return cls(a.to(device), b.to(device))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, step: LoraStep) -> None:
        """out[t] += B_s (A_s x[t]) for every row t and the adapter s it uses."""
        layout, slots, width = step.layout, step.slots, self.a.shape[2]
        if isinstance(layout, DenseRows):
            shrunk = torch.mm(x, self.a.view(self.a.shape[0], -1)[:, : slots * width])
            if layout.drop is not None:
                shrunk.view(-1, slots, width).masked_fill_(layout.drop, 0)
            out.addmm_(shrunk, self.b[:slots].view(slots * width, -1))
        elif isinstance(layout, PaddedRows):
            xs = x if layout.every_row else x.index_select(0, layout.gather)
            shrunk = torch.bmm(xs.view(slots, layout.per_slot, -1), self.a[:, :slots].transpose(0, 1))
            if layout.drop is not None:
                shrunk.masked_fill_(layout.drop, 0)
            delta = torch.bmm(shrunk, self.b[:slots]).view(-1, out.shape[1])
            if layout.every_row:
                out.add_(delta)
            else:
                out.index_add_(0, layout.gather, delta)
        else:
            xs = x if layout.every_row else x.index_select(0, layout.rows)
            delta = out.new_empty(xs.shape[0], out.shape[1])
            for slot, start, stop in layout.groups:
                torch.mm(torch.mm(xs[start:stop], self.a[:, slot]), self.b[slot], out=delta[start:stop])
            if layout.every_row:
                out.add_(delta)
            else:
                out.index_add_(0, layout.rows, delta)


def column_lora(adapters: Sequence[LoraAdapter], layer: int, parts: Sequence[tuple[str, tuple[int, int]]],
                dtype: torch.dtype, device: torch.device) -> LoraProjection | None:
    """A column-parallel (possibly fused) projection: `parts` are (projection name, the output
    rows of the base weight this rank holds); A whole, B cut to those rows."""
    slots = [[_rows(adapter.module(layer, name), span) for name, span in parts] for adapter in adapters]
    return LoraProjection.build(slots, [stop - start for _, (start, stop) in parts], dtype, device)


def row_lora(adapters: Sequence[LoraAdapter], layer: int, name: str, cols: tuple[int, int], out_features: int,
             dtype: torch.dtype, device: torch.device) -> LoraProjection | None:
    """A row-parallel projection: `cols` are the input columns of the base weight this rank
    holds; A cut to those columns, B whole."""
    start, stop = cols
    slots = [[_cols(adapter.module(layer, name), start, stop)] for adapter in adapters]
    return LoraProjection.build(slots, [out_features], dtype, device)


def _rows(module: LoraModule | None, span: tuple[int, int]) -> LoraModule | None:
    return None if module is None else replace(module, b=module.b[span[0] : span[1]])


def _cols(module: LoraModule | None, start: int, stop: int) -> LoraModule | None:
    return None if module is None else replace(module, a=module.a[:, start:stop])
