"""One MoE layer's virtual activation vector held without its zeros (issue 10).

The virtual vector ``v = [w_1 a_1, ..., w_E a_E, g a_s]`` of :mod:`sparsing_utils.moe` is zero for
every expert that did not run on a token. Inside the hooks it is kept as :class:`ExpertRows`: each
expert's columns on the tokens routed to it, the shared columns on every token; the full width is
built only for a caller that asks for it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import cett
from .cett import all_finite

__all__ = ["ExpertRows"]

@dataclass(eq=False)
class ExpertRows:
    """One MoE layer's virtual vector ``v [tokens, d_ff]`` (module doc) stored without the zeros of
    the experts that did not run: expert ``e``'s columns ``[e d_expert, (e + 1) d_expert)`` only on
    the tokens routed to it, the shared columns (after ``E d_expert``) on every token.

    The same layout holds the gate scores ``act(W_gate x)`` and boolean masks (a rule's kept
    neurons). Entries not stored are zeros (``False`` for a mask). ``lead`` is the ``[batch, seq]``
    of the forward that made it (``(tokens,)`` once rows were selected or concatenated)."""

    n_tokens: int
    d_expert: int
    rows: list[torch.Tensor]  # per expert: [n_e] int64, the tokens (rows of v) routed to it, each once
    values: list[torch.Tensor]  # per expert: [n_e, d_expert]
    shared: torch.Tensor | None  # [tokens, d_shared], or None
    lead: tuple[int, ...] = ()
    ascending: bool = False  # every expert's rows are in ascending order (sorted())

    @property
    def num_experts(self) -> int:
        return len(self.rows)

    @property
    def d_shared(self) -> int:
        return 0 if self.shared is None else self.shared.shape[-1]

    @property
    def d_ff(self) -> int:
        return self.num_experts * self.d_expert + self.d_shared

    @property
    def shape(self) -> tuple[int, int]:  # of the full vector: [tokens, d_ff]
        return self.n_tokens, self.d_ff

    @property
    def dtype(self) -> torch.dtype:
        return self.values[0].dtype

    @property
    def device(self) -> torch.device:
        return self.values[0].device

    def sorted(self) -> ExpertRows:
        """Each expert's rows in ascending token order (the forward keeps transformers' order, which
        its products depend on bitwise; the CETT statistics want tokens in order)."""
        if self.ascending:
            return self
        rows, values = [], []
        for r, x in zip(self.rows, self.values):
            order = r.argsort(stable=True)
            rows.append(r[order])
            values.append(x[order])
        return ExpertRows(self.n_tokens, self.d_expert, rows, values, self.shared, self.lead, True)

    def parts(self) -> list[tuple[slice, torch.Tensor | None, torch.Tensor]]:
        """``(columns, rows [n] or None for every token, values [n, width])``: the experts in order,
        then the shared columns (what :func:`~sparsing_utils.cett.truncated_statistics` reads, sorted)."""
        de = self.d_expert
        out = [(slice(e * de, (e + 1) * de), r, x) for e, (r, x) in enumerate(zip(self.rows, self.values))]
        if self.shared is not None:
            out.append((slice(self.num_experts * de, self.d_ff), None, self.shared))
        return out

    def full(self) -> torch.Tensor:
        """The full vector ``[*lead, d_ff]`` (zeros / False where nothing is stored)."""
        x = self.values[0]
        out = x.new_zeros(self.n_tokens, self.d_ff)  # [tokens, d_ff]
        for cols, r, vals in self.parts():
            if r is None:
                out[:, cols] = vals
            elif len(r):
                out[r, cols] = vals
        return out.view(*(self.lead or (self.n_tokens,)), self.d_ff)

    def gather(self, full: torch.Tensor) -> ExpertRows:
        """The stored entries' places read from a full ``[..., tokens, d_ff]`` tensor (an edited ``v``)."""
        flat = full.reshape(self.n_tokens, self.d_ff)
        de, e_all = self.d_expert, self.num_experts
        values = [flat[r, e * de:(e + 1) * de] for e, r in enumerate(self.rows)]
        shared = flat[:, e_all * de:] if self.shared is not None else None
        return ExpertRows(self.n_tokens, de, self.rows, values, shared, self.lead, self.ascending)

    def map(self, fn: Callable[[slice, torch.Tensor, torch.Tensor | None], torch.Tensor],
            other: ExpertRows | None = None) -> ExpertRows:
        """``fn(columns, values, other's values there or None)`` on every stored block: same rows, new
        values (``other``: the same routing, e.g. the gate scores or a mask)."""
        de, e_all = self.d_expert, self.num_experts
        theirs = other.values if other is not None else [None] * e_all
        values = [fn(slice(e * de, (e + 1) * de), x, y) for e, (x, y) in enumerate(zip(self.values, theirs))]
        shared = None
        if self.shared is not None:
            shared = fn(slice(e_all * de, self.d_ff), self.shared, None if other is None else other.shared)
        return ExpertRows(self.n_tokens, de, self.rows, values, shared, self.lead, self.ascending)

    def row_sums(self) -> torch.Tensor:
        """Per token, the sum of its stored entries in float32 (for a mask: the neurons kept): ``[*lead]``,
        summed expert by expert (scatter-add over each expert's rows)."""
        out = self.values[0].new_zeros(self.n_tokens, dtype=torch.float32)  # [tokens]
        for r, x in zip(self.rows, self.values):
            if len(r):
                out.index_add_(0, r, x.sum(dim=-1, dtype=torch.float32))
        if self.shared is not None:
            out += self.shared.sum(dim=-1, dtype=torch.float32)
        return out.view(*(self.lead or (self.n_tokens,)))

    def zeros_left_out(self) -> int:
        """Entries of the full vector that are not stored (zeros)."""
        return self.n_tokens * self.num_experts * self.d_expert - sum(len(r) for r in self.rows) * self.d_expert

    def all_finite(self) -> torch.Tensor:
        """0-dim bool: no NaN or inf stored (:func:`~sparsing_utils.cett.all_finite`)."""
        pieces = [x for x in (*self.values, self.shared) if x is not None and x.numel()]
        if not pieces:
            return torch.ones((), dtype=torch.bool, device=self.values[0].device)
        return all_finite(torch.stack([x.sum(dtype=torch.float32) for x in pieces]))

    @property
    def nbytes(self) -> int:  # the padded buffers where the entries are held in them
        held = [t for pair in self.padded_buffers() or [] for t in pair] or [*self.rows, *self.values]
        return sum(t.numel() * t.element_size() for t in (*held, self.shared) if t is not None)

    def take(self, index: torch.Tensor) -> ExpertRows:
        """The tokens ``index [m]`` (ascending), renumbered ``0..m-1``: rows of the real tokens of a
        padded batch, or the guide tokens. Each expert keeps its rows among them, in their order."""
        remap = torch.full((self.n_tokens,), -1, dtype=torch.int64, device=index.device)  # token -> new row
        remap[index] = torch.arange(len(index), device=index.device)
        rows, values = [], []
        for r, x in zip(self.rows, self.values):
            new = remap[r]  # [n_e]
            kept = new >= 0
            rows.append(new[kept])
            values.append(x[kept])
        shared = self.shared.index_select(0, index) if self.shared is not None else None
        return ExpertRows(len(index), self.d_expert, rows, values, shared, (len(index),), self.ascending)

    @staticmethod
    def cat(parts: Sequence[ExpertRows], *, padded: bool = False) -> ExpertRows:
        """Parts over consecutive tokens (batches) as one: each expert's rows offset by the tokens before.

        ``padded``: each expert's rows and values are written at the start of buffers of
        :func:`~sparsing_utils.cett.gemm_rows` rows (on CUDA), zero rows after (token 0, values 0), and
        held as views of them; :meth:`padded_buffers` hands the buffers to the products of the CETT
        statistics, which would otherwise pad a copy at every evaluation (:func:`~sparsing_utils.cett.pad_rows`).
        The entries are the same, held once."""
        first, offsets, n = parts[0], [], 0
        for p in parts:
            offsets.append(n)
            n += p.n_tokens
        rows, values, buffers = [], [], []
        for e in range(first.num_experts):
            r = [p.rows[e] + o for p, o in zip(parts, offsets)]
            x = [p.values[e] for p in parts]
            m = sum(len(t) for t in r)
            pad = cett.gemm_rows(m, x[0].device) - m if padded else 0
            if pad:  # zero rows appended in the same copy
                r.append(r[0].new_zeros(pad))
                x.append(x[0].new_zeros(pad, x[0].shape[1]))
            rb, xb = torch.cat(r), torch.cat(x)  # [m + pad], [m + pad, d_expert]
            rows.append(rb[:m])
            values.append(xb[:m])
            buffers.append((rb, xb))
        shared = torch.cat([p.shared for p in parts]) if first.shared is not None else None
        out = ExpertRows(n, first.d_expert, rows, values, shared, (n,), all(p.ascending for p in parts))
        if padded:
            out._buffers = buffers
        return out

    def with_row_padding(self) -> ExpertRows:
        """The same entries, sorted, held in padded buffers (:meth:`cat` with ``padded``; one copy on CUDA),
        for a layer whose statistics are evaluated several times."""
        a = self.sorted()
        return ExpertRows.cat([a], padded=True) if a.device.type == "cuda" else a  # the CPU pads nothing

    def padded_buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per expert, its rows ``[gemm_rows(n_e)]`` and values ``[gemm_rows(n_e), d_expert]`` with the zero
        rows after the stored ones (:meth:`cat` with ``padded``), or None when not held so (``map()``,
        ``take()`` and ``gather()`` make new entries, without buffers)."""
        return getattr(self, "_buffers", None)
