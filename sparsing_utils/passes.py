"""One forward pass of the probe over its token blocks: what its hooks and statistics share.

* :class:`TokenRows` - the real (non-padding) tokens of the batch being run, for hooks that see
  ``[batch, seq, ...]``;
* :func:`curve_token_mask` - which tokens the guide curves are estimated on (inside each block:
  the same subset for every split of the blocks over processes);
* :class:`PassStats` - the result of one pass (PPL, activation ratios per layer and token);
* small helpers on a layer's activations, held as a ``[tokens, d_ff]`` tensor or, for an MoE
  layer, as :class:`~sparsing_utils.moe.ExpertRows`; the all-reduces of the distributed case.

Split out of :mod:`sparsing_utils.probe` (issue 10), which holds the probe itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .cett import NormHistogram, neuron_norms
from .moe import ExpertRows

__all__ = ["PassStats", "TokenRows", "curve_token_mask"]


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def curve_token_mask(attention_mask: torch.Tensor, stride: int) -> torch.Tensor:
    """The tokens that the guide curves are estimated on: in every block, the real tokens whose
    index among the block's real tokens is ``stride - 1, 2 * stride - 1, ...`` (the first token,
    often an outlier, is skipped unless ``stride`` is 1). ``[n_blocks, block_len]`` bool.

    The choice depends only on each block's own mask, never on which process holds the block or
    on its neighbours, so the subset (and the curves) is the same for every split of the blocks.
    """
    real = attention_mask.bool()
    index = real.long().cumsum(dim=1) - 1  # [n_blocks, block_len] index among the block's real tokens
    return real & (index % stride == stride - 1)


class TokenRows:
    """The real (non-padding) tokens of the batch being run, for hooks that see ``[batch, seq, ...]``.

    :meth:`SparsityProbe._run` calls :meth:`next_batch` with each batch's attention mask (on the
    CPU, so nothing waits for the device) before its forward; hooks then call the object on a
    tensor to get its real-token rows. ``start:stop`` is where those tokens sit among all real
    tokens of the run (the columns of per-token statistics).
    """

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # [real tokens] rows of a padded batch, on the device
        self.all_valid = True
        self.start = self.stop = 0

    def next_batch(self, mask: torch.Tensor, device: torch.device | None = None) -> None:
        """``mask [batch, seq]`` (CPU); a padded batch's row index goes to ``device`` once, for
        every hook of the batch (pinned and asynchronous on CUDA)."""
        valid = mask.bool()
        self.all_valid = bool(valid.all())
        self.start = self.stop
        self.index = None
        if self.all_valid:
            self.stop = self.start + valid.numel()
            return
        index = valid.reshape(-1).nonzero().squeeze(1)
        self.stop = self.start + len(index)
        if device is not None and device.type == "cuda":
            index = index.pin_memory().to(device, non_blocking=True)
        self.index = index

    def __call__(self, x: torch.Tensor | ExpertRows) -> torch.Tensor | ExpertRows:
        """``x [batch, seq, ...]`` -> ``[tokens, ...]`` (a view when the batch has no padding;
        never a device synchronisation). An MoE layer's :class:`ExpertRows` keep their real tokens."""
        if isinstance(x, ExpertRows):
            return x if self.all_valid else x.take(self.index.to(x.values[0].device))
        flat = x.reshape(-1, *x.shape[2:])
        return flat if self.all_valid else flat.index_select(0, self.index.to(x.device))


# MoE layers' activations are held as ExpertRows (sparsing_utils.moe: each expert's rows of the tokens
# routed to it, never the full E * d_expert width); dense layers' as [tokens, d_ff] tensors.

def _take(a: torch.Tensor | ExpertRows, index: torch.Tensor) -> torch.Tensor | ExpertRows:
    """The rows ``index [m]`` (ascending) of ``a [tokens, d_ff]``."""
    return a.take(index) if isinstance(a, ExpertRows) else a.index_select(0, index.to(a.device))


def _cat(pieces: list, *, padded: bool = False) -> torch.Tensor | ExpertRows:
    """Batches of one layer's activations, in token order, as one (``padded``: an MoE layer's held
    for repeated products, ``ExpertRows.cat``)."""
    return ExpertRows.cat(pieces, padded=padded) if isinstance(pieces[0], ExpertRows) else torch.cat(pieces)


def _sum32(a: torch.Tensor | ExpertRows) -> torch.Tensor:  # 0-dim float32
    """The sum of every entry in float32: non-finite iff an entry is NaN or inf (or the sum
    overflows, which the caller reports the same way), checked on the host after a pass."""
    if isinstance(a, ExpertRows):
        pieces = [x.sum(dtype=torch.float32) for x in (*a.values, a.shared) if x is not None and x.numel()]
        return torch.stack(pieces).sum() if pieces else torch.zeros((), device=a.values[0].device)
    return a.sum(dtype=torch.float32)


def _every_stride(x: torch.Tensor, blocks: int, stride: int) -> torch.Tensor:
    """Rows ``stride - 1, 2 * stride - 1, ...`` of every block of ``x [blocks * block_len, ...]``
    (:func:`curve_token_mask` of blocks without padding), copied out through a strided slice: no index
    kernel (``index_select``'s first use in a process costs about 20 ms on an H200). Always a copy when
    ``stride > 1``: a view would keep the whole batch's rows alive (stream mode's memory grew with the
    tokens, 4.7 -> 24 GiB from 16,384 to 131,072 tokens on the 836M Llama, benchmarks/RESULTS.md session 10)."""
    v = x.view(blocks, -1, *x.shape[1:])  # [blocks, block_len, ...]
    if stride == 1:  # every row: x itself (the caller keeps all of them anyway)
        return x
    return v[:, stride - 1::stride].contiguous().reshape(-1, *x.shape[1:])  # [blocks * (block_len // stride), ...]


def _histogram_add(hist: NormHistogram, layer: int, a: torch.Tensor | ExpertRows, device: torch.device,
                   col_norms: torch.Tensor | None = None) -> None:
    """Every entry's ``|a_i|`` (times ``||W_down[:, i]||`` with ``col_norms``: the neuron norm) into
    one layer's histogram; an MoE layer's entries not stored (experts that did not run) as zeros."""
    blocks = a.parts() if isinstance(a, ExpertRows) else [(slice(None), None, a)]
    for cols, _, x in blocks:
        hist.add(layer, (x.float().abs() if col_norms is None else neuron_norms(x, col_norms[cols])).to(device))
    if isinstance(a, ExpertRows):
        hist.add_zeros(layer, a.zeros_left_out())


class _EnoughLayers(Exception):
    """Raised by a statistics hook once every layer it reads in this batch has been read: the
    rest of the forward (later layers, the LM head) is not needed (stream mode, issue 10)."""


@dataclass
class PassStats:
    """One forward pass over all blocks (dense or sparse)."""

    nll_sum: float
    n_predicted: int
    layer_active: torch.Tensor | None = None  # [layers] activated fraction
    layer_token_active: torch.Tensor | None = None  # [layers, tokens] activated fraction (float16)
    # MoE models: [layers] activated fraction of the neurons of the experts that ran (+ shared);
    # ``layer_active`` counts over all expert neurons of each layer. None for dense models.
    layer_active_ran: torch.Tensor | None = None
    # [blocks run here, block_len - 1] next-token NLL (0 at padding), this process's blocks only
    token_nll: torch.Tensor | None = None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / max(1, self.n_predicted))

    @property
    def activation_ratio(self) -> float:
        return float(self.layer_active.mean()) if self.layer_active is not None else 1.0

    @property
    def activation_ratio_ran(self) -> float | None:
        return float(self.layer_active_ran.mean()) if self.layer_active_ran is not None else None

    @property
    def token_active(self) -> torch.Tensor | None:  # [tokens]
        return None if self.layer_token_active is None else self.layer_token_active.float().mean(dim=0)
