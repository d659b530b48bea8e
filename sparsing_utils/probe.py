"""One model on one set of token blocks: the dense pass, exact CETT statistics, sparse passes.

The probe is the measuring instrument of PPL-p% sparsity (Luo et al. 2024, Sec. 3.1;
PAPER.md Sec. 1); the search on the CETT target lives in :mod:`sparsing_utils.search`.

* :meth:`SparsityProbe.prepare` runs the dense pass once: dense PPL; each layer's CETT curve
  on a grid of thresholds, estimated on about ``curve_tokens`` tokens spread over every block
  (:func:`curve_token_mask`) through a random projection of ``W_down`` (a guide only); in memory
  mode, the activations ``a`` of every layer.
* :meth:`SparsityProbe.thresholds_for` finds per-layer thresholds whose *exact* mean CETT
  (Eq. 2, on all tokens) is a target ``c``: a first guess from the curve, then secant steps.
* :meth:`SparsityProbe.sparse_pass` runs the model under a rule: PPL and activation ratios.
* :meth:`SparsityProbe.exact_curve` gives exact CETT on all tokens at a grid of thresholds
  (the figure of CETT against the threshold).

Two modes: ``"memory"`` keeps every layer's ``a`` (fastest; memory grows with layers x
tokens); ``"stream"`` keeps only the guide tokens' activations (about ``curve_tokens x d_ff``
per layer) and recomputes the dense pass (up to the last layer still needed) whenever exact CETT
statistics are needed,
accumulating them chunk by chunk inside the hooks (peak memory does not grow with the budget); when
every block fits one batch on one process, :meth:`SparsityProbe.thresholds_for` refines each layer's
threshold to the end inside its hook, one dense pass per target. A memory-mode probe whose activations were dropped with
:meth:`SparsityProbe.release` computes further statistics as stream mode does.

Under ``torch.distributed`` each rank holds its own shard of the blocks (any split: strided,
contiguous, uneven) and the answer does not depend on the split: the tokens of the guide
curves are chosen by their place inside their block, so every world size uses the same
global subset (each rank measures its part of it); the threshold grid comes from a histogram
of that subset's norms (integer counts, summed exactly); every other statistic is a float64
sum all-reduced across ranks (losses, CETT sums, activated counts), which only the rounding
of float64 additions can tell apart. The gate-score histogram that places the FAT baseline
(:meth:`SparsityProbe.gate_histogram`) takes its tokens by the same rule. No collective runs
inside a hook, so ranks may run different numbers of batches.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cett import (
    CETTCurve,
    NormHistogram,
    PendingCopy,
    activation_limits,
    cett_statistics,
    compare_limits,
    host_to_device,
    interpolate_thresholds,
    l2_norm,
    refine_steps,
    refine_thresholds,
    sketch_projection,
    sketch_weight,
)
from .ffn import FFNSite, edit_activations, find_ffn_sites, read_activations
from .moe import ExpertRows
from .passes import (
    PassStats,
    TokenRows,
    _all_reduce,
    _all_reduce_min,
    _cat,
    _EnoughLayers,
    _every_stride,
    _histogram_add,
    _sum32,
    _take,
    curve_token_mask,
)
from .rules import SparsityRule, apply_rule

__all__ = ["DEFAULT_LEVELS", "PassStats", "SparsityProbe", "curve_token_mask"]

# Activation-ratio levels at which each layer's CETT curve is sampled (geometric, 0.2%..98%).
DEFAULT_LEVELS = tuple(float(x) for x in torch.logspace(math.log10(0.002), math.log10(0.98), 24))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# The next-token loss of a batch is taken on float32 copies of at most this many bytes of logits at a time
# (whole blocks; at least one): the float32 copy and its log-softmax are the passes' largest temporaries
# (16,384 tokens of a 49,152-word vocabulary: 3.2 GB each, at once), and each token's loss is the same
# whatever rows it is computed with.
LOSS_CHUNK_BYTES = 512 * 2**20


def token_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # [batch, seq]
    """Next-token NLL ``[batch, seq]`` of ``logits [batch, seq, vocab]`` at ``target [batch, seq]``
    (0 where the target is -100), in float32, on :data:`LOSS_CHUNK_BYTES` of float32 logits at a time."""
    per = max(1, LOSS_CHUNK_BYTES // (4 * logits.shape[1] * logits.shape[2]))  # blocks per chunk
    parts = [F.cross_entropy(logits[i:i + per].float().reshape(-1, logits.shape[-1]),  # one copy of the slice
                             target[i:i + per].reshape(-1), reduction="none", ignore_index=-100)
             for i in range(0, logits.shape[0], per)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).view_as(target)


# Stream mode's one-pass refinement (SparsityProbe._refine_in_one_pass): a layer's evaluations may run
# at most this many layers' hooks behind its own, so that at most this many more layers' activations
# ``[tokens, d_ff]`` are held at once than one (issue 10; most layers need one or two evaluations).
PIPELINE_LAYERS = 2


class SparsityProbe:
    """One model on one set of token blocks: the dense pass is computed once, here.

    Parameters: ``blocks`` is a :class:`~sparsing_utils.blocks.TokenBlocks` (or anything with
    ``input_ids`` and ``attention_mask`` ``[n_blocks, block_len]``); ``mode`` is ``"memory"``
    or ``"stream"``. The CETT curves that guide the exact threshold search are estimated on the
    first ``curve_tokens`` tokens, through a ``sketch_dim``-dimensional random projection.
    With ``calibration`` (another probe on the same model), thresholds come from the
    calibration tokens and PPL from these.
    """

    def __init__(self, model: nn.Module, blocks, *, mode: str = "memory", batch_size: int | None = None,
                 sketch_dim: int = 64, curve_tokens: int = 1024, levels: Sequence[float] = DEFAULT_LEVELS,
                 progress: bool = False, name: str = "model", sites: Sequence[FFNSite] | None = None,
                 calibration: SparsityProbe | None = None):
        if mode not in ("memory", "stream"):
            raise ValueError(f"mode must be 'memory' or 'stream', got {mode!r}")
        self.model = model
        self.name = name
        if calibration is not None and calibration.model is not model:
            raise ValueError("the calibration probe must wrap the same model object")
        self.calibration = calibration
        self.mode = mode
        self.progress = progress
        self.sites = list(sites) if sites is not None else find_ffn_sites(model)
        self.device = _model_device(model)
        ids = blocks.input_ids
        mask = getattr(blocks, "attention_mask", None)
        if mask is None:
            mask = torch.ones_like(ids)
        if ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(f"token blocks must be [n_blocks, block_len >= 2], got {tuple(ids.shape)}")
        self.input_ids, self.attention_mask = ids, mask
        block_len = ids.shape[1]
        if batch_size is None:
            budget = 32768 if self.device.type == "cuda" else 4096
            batch_size = max(1, budget // block_len)
        self.batch_size = int(batch_size)
        self.sketch_dim = int(sketch_dim)
        self.curve_tokens = int(curve_tokens)
        self.levels = torch.tensor(sorted(levels), dtype=torch.float64)
        self.col_norms = [s.column_norms() for s in self.sites]  # on the device of W_down
        # On the host too (one copy per layer, here): every threshold's limits on |a| are computed there
        # (cett.activation_limits, cett.compare_limits) and copied once per evaluation, for all layers.
        self.host_col_norms = [cn.cpu() for cn in self.col_norms]
        self._act_dtype = [s.weight_t().dtype if s.weight_t().is_floating_point() else torch.float32
                           for s in self.sites]  # the dtype of a (that of W_down)
        same = len({cn.numel() for cn in self.host_col_norms}) == 1 and len(set(self._act_dtype)) == 1
        self._stacked_col_norms = torch.stack(self.host_col_norms) if same else None  # [layers, d_ff]: one op for all
        self.dense: PassStats | None = None
        self.curve: CETTCurve | None = None
        if self.curve_tokens < 1:
            raise ValueError(f"curve_tokens must be >= 1, got {curve_tokens!r}")
        self.n_tokens = int(_all_reduce(mask.sum().to(torch.float64).to(self.device)).item())
        # Fewest blocks on a process and the shortest non-empty block (real tokens), over all processes.
        real = mask.sum(dim=1)
        real = real[real > 0]
        fewest = _all_reduce_min(torch.tensor([float(ids.shape[0]), float(real.min()) if len(real) else math.inf],
                                              dtype=torch.float64, device=self.device)).tolist()
        if fewest[0] < 1:  # every process runs the same collectives: one without blocks cannot
            import torch.distributed as dist

            raise ValueError(f"a process has no token blocks ({ids.shape[0]} here, {dist.get_world_size()} "
                             "processes): give every process at least one block (more blocks or fewer processes)")
        # The guide curves' tokens: about curve_tokens of them, every stride-th real token of
        # every block (a block of the shortest length still gives one).
        self.curve_stride = max(1, int(min(math.ceil(self.n_tokens / self.curve_tokens), fewest[1])))
        self._curve_rows = curve_token_mask(mask, self.curve_stride)[mask.bool()]  # [local real tokens] bool
        self._unpadded = bool(mask.bool().all())  # guide rows: every curve_stride-th row of each block
        self._acts: list | None = None  # memory mode: [tokens, d_ff] per layer (MoE layers: ExpertRows)
        self._ynorm: list[torch.Tensor] | None = None  # memory mode: [tokens] per layer
        self.sparse_passes = 0
        self.dense_passes = 0
        self.cett_evaluations = 0
        self._threshold_cache: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._exact_points: list[tuple[torch.Tensor, torch.Tensor]] = []

    # -- passes ---------------------------------------------------------------------------
    def _batches(self, blocks: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(ids, mask)`` on the device, then the ids and mask on the CPU, batch by batch (copied
        through pinned memory on CUDA: the host does not wait)."""
        idx = list(range(self.input_ids.shape[0])) if blocks is None else list(blocks)
        for i in range(0, len(idx), self.batch_size):
            sel = idx[i:i + self.batch_size]
            ids, mask = self.input_ids[sel], self.attention_mask[sel]
            yield host_to_device(ids, self.device), host_to_device(mask, self.device), ids, mask

    def _progress(self, desc: str, blocks: Sequence[int] | None = None):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        n = self.input_ids.shape[0] if blocks is None else len(blocks)
        return tqdm(total=math.ceil(n / self.batch_size), desc=desc, leave=False)

    @torch.no_grad()
    def _run(self, desc: str, rows: TokenRows | None = None, blocks: Sequence[int] | None = None,
             compute_loss: bool = True, token_nll: list[torch.Tensor] | None = None) -> tuple[float, int]:
        """Forward over blocks: ``(sum of next-token NLL, predicted tokens)``, all-reduced.
        ``rows`` (for the hooks) is moved to each batch before its forward; ``token_nll``, when
        given, receives each batch's ``[batch, block_len - 1]`` NLL (0 at padding). The host reads
        the device once, at the end (a NaN/inf loss makes the NLL sum non-finite, checked then)."""
        nll = torch.zeros((), dtype=torch.float64, device=self.device)  # NLL sum
        count = 0  # predicted tokens, counted on the host
        bar = self._progress(desc, blocks)
        try:
            for ids, mask, cpu_ids, cpu_mask in self._batches(blocks):
                if rows is not None:
                    rows.next_batch(cpu_mask, self.device)
                if compute_loss:  # the targets, -100 (ignored: NLL 0) where a token or its context is padding
                    valid = (cpu_mask[:, 1:] * cpu_mask[:, :-1]).bool()  # [batch, seq-1]
                    count += int(valid.sum())
                    target = host_to_device(cpu_ids[:, 1:].masked_fill(~valid, -100), self.device)
                try:
                    out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _EnoughLayers:
                    if compute_loss:
                        raise
                    out = None
                if compute_loss:
                    logits = out.logits[:, :-1]  # [batch, seq-1, vocab]
                    loss = token_losses(logits, target.to(logits.device))  # [batch, seq-1]
                    if token_nll is not None:
                        token_nll.append(loss)
                    nll += loss.double().sum().to(self.device)  # the head may sit on another GPU
                del out
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        sums = torch.stack([nll, torch.tensor(float(count), dtype=torch.float64).to(self.device)])
        nll, count = _all_reduce(sums).tolist()
        if compute_loss and not math.isfinite(nll):  # a NaN/inf loss on any batch (of any process)
            raise FloatingPointError(
                f"non-finite loss in the {desc} pass of {self.name}: the model produces NaN/inf "
                "on this text; load it in float32 (dtype='float32') or check the input ids")
        return nll, int(count)

    def prepare(self) -> SparsityProbe:
        """The dense pass (once): dense PPL, stored activations (memory mode), then the
        per-layer CETT curves on the guide tokens (:func:`curve_token_mask`). With a calibration
        probe, only the dense PPL is computed here; thresholds come from the calibration."""
        if self.dense is not None:
            return self
        if self.calibration is not None:
            self.calibration.prepare()
            token_nll: list[torch.Tensor] = []
            nll, count = self._run(f"dense pass ({self.name})", token_nll=token_nll)
            self.dense_passes += 1
            if count == 0:
                raise ValueError("no predicted tokens: every block is padding or shorter than 2 tokens")
            self.dense = PassStats(nll, count, token_nll=torch.cat(token_nll).float().cpu())
            self.curve = self.calibration.curve
            return self
        acts: list[list[torch.Tensor]] = [[] for _ in self.sites]
        ynorms: list[list[torch.Tensor]] = [[] for _ in self.sites]
        strided = self._unpadded  # stream mode: the guide rows of dense layers as strided copies
        moe = any(s.moe is not None for s in self.sites)  # MoE layers take their guide rows by index
        guide = self._guide_rows_by_batch() if self.mode == "stream" and (moe or not strided) else {}
        rows = TokenRows()
        sums: list[list[torch.Tensor]] = [[] for _ in self.sites]  # float32 sums of a, checked after the pass

        def read(site: FFNSite, a: torch.Tensor | ExpertRows, y: torch.Tensor):
            i = site.index
            av = rows(a)  # [tokens, d_ff] (MoE: ExpertRows)
            sums[i].append(_sum32(av))
            yn = l2_norm(rows(y))  # [tokens]
            if self.mode == "memory":
                acts[i].append(av.sorted() if isinstance(av, ExpertRows) else av)  # sorted once, for the statistics
                ynorms[i].append(yn)
            elif strided and not isinstance(av, ExpertRows):  # the guide rows of whole blocks: a strided copy
                n = (rows.stop - rows.start) // self.input_ids.shape[1]  # blocks in this batch
                acts[i].append(_every_stride(av, n, self.curve_stride))
                ynorms[i].append(_every_stride(yn, n, self.curve_stride))
            else:  # keep only the guide tokens' rows (about curve_tokens in all)
                sel = guide[rows.start, rows.stop]
                acts[i].append(_take(av, sel))
                ynorms[i].append(yn.index_select(0, sel.to(yn.device)))

        def check_activations():
            flat = [x for layer in sums for x in layer]
            if not flat:
                return
            ok = torch.isfinite(torch.stack([x.to(self.device) for x in flat]).cpu()).tolist()  # one copy
            bad, k = None, 0
            for site, layer in zip(self.sites, sums):
                if not all(ok[k:k + len(layer)]):
                    bad = site.name
                    break
                k += len(layer)
            if bad is not None:
                raise FloatingPointError(f"non-finite FFN activations at {bad}: the model produces NaN/inf on "
                                         "this input; load it in float32 (dtype='float32') or check the input ids")

        token_nll: list[torch.Tensor] = []
        try:
            with read_activations(self.model, read, sites=self.sites, with_output=True, compact=True):
                nll, count = self._run(f"dense pass ({self.name})", rows, token_nll=token_nll)
        except FloatingPointError:
            check_activations()  # name the first layer that went non-finite, if one did
            raise
        self.dense_passes += 1
        check_activations()
        if count == 0:
            raise ValueError("no predicted tokens: every block is padding or shorter than 2 tokens")
        self.dense = PassStats(nll, count, token_nll=torch.cat(token_nll).float().cpu())
        a_all = [_cat(x, padded=self.mode == "memory") for x in acts]  # memory: evaluated again and again
        y_all = [torch.cat(x) for x in ynorms]
        acts.clear()  # the per-batch pieces
        ynorms.clear()
        if self.mode == "memory":
            self._acts, self._ynorm = a_all, y_all
            n_blocks = self.input_ids.shape[0]
            if self._unpadded:  # every curve_stride-th row of each block: strided copies, no index kernel
                a_all = [_take(a, self._curve_index()) if isinstance(a, ExpertRows) else
                         _every_stride(a, n_blocks, self.curve_stride) for a in a_all]
                y_all = [_every_stride(y, n_blocks, self.curve_stride) for y in y_all]
            else:
                sel = self._curve_index()
                a_all = [_take(a, sel) for a in a_all]
                y_all = [y.index_select(0, sel.to(y.device)) for y in y_all]
        self.curve = self._guide_curve(a_all, y_all)
        return self

    def _curve_index(self) -> torch.Tensor:
        """The guide tokens' rows among this process's real tokens ``[m]``, on the device (one copy, cached)."""
        if getattr(self, "_curve_index_dev", None) is None:
            self._curve_index_dev = host_to_device(self._curve_rows.nonzero().squeeze(1), self.device)
        return self._curve_index_dev

    def _guide_rows_by_batch(self, chosen: torch.Tensor | None = None) -> dict[tuple[int, int], torch.Tensor]:
        """Stream mode: for each batch of :meth:`_run` (keyed by its rows ``start, stop`` among
        this process's real tokens), the rows of its real tokens that are guide tokens (or
        ``chosen [local real tokens]`` bool), already on the device (copied before the pass, so
        the hooks never wait for a copy)."""
        chosen = self._curve_rows if chosen is None else chosen
        real = self.attention_mask.sum(dim=1)  # [n_blocks]
        out, start = {}, 0
        for b in range(0, len(real), self.batch_size):
            stop = start + int(real[b:b + self.batch_size].sum())
            out[start, stop] = host_to_device(chosen[start:stop].nonzero().squeeze(1), self.device)
            start = stop
        return out

    def _guide_curve(self, a: list, y_norm: list[torch.Tensor]) -> CETTCurve:
        """Each layer's CETT curve on this process's guide tokens, ``a [tokens, d_ff]`` (MoE: ExpertRows) and
        ``y_norm [tokens]`` per layer, combined over processes: the grid (0, then the norm
        quantiles at which the activation ratio is each of ``levels``) from a histogram of the
        neuron norms (integer counts: the same grid for every split), then the mean CETT at the
        grid through a ``sketch_dim``-dimensional sketch of ``W_down``. Two all-reduces in all.

        The host reads the device twice (the histogram, then the curve): the quantiles are
        taken on the CPU, and the grid and the sketches' projections go to the device in one
        copy each, so no layer waits for a transfer."""
        hist = NormHistogram(len(self.sites), device=self.device)
        for site in self.sites:
            _histogram_add(hist, site.index, a[site.index], self.device, self.col_norms[site.index])
        hist.all_reduce()
        q = hist.cpu().quantiles(1 - self.levels).sort(dim=1).values  # [layers, K]
        grid = torch.cat([torch.zeros(len(self.sites), 1), q], dim=1)  # [layers, K+1] on the CPU
        limits = self._limits(grid)  # [K+1, d_ff] per layer, on the device
        projs = self._sketch_projections()
        sums = torch.zeros(len(self.sites), grid.shape[1] + 1, dtype=torch.float64, device=self.device)
        # the guide token count of every layer in one copy (a Python number written into a device
        # tensor is a blocking copy from the host: one per layer)
        sums[:, -1] = host_to_device(torch.tensor([float(a[s.index].shape[0]) for s in self.sites],
                                                  dtype=torch.float64), self.device)
        for site in self.sites:
            i = site.index
            sketch = sketch_weight(site.weight_t().detach(), self.sketch_dim, seed=i, proj=projs.get(i))
            c, _ = cett_statistics(a[i], sketch, self.col_norms[i], grid[i], y_norm[i], blocks=site.expert_blocks,
                                   limits=limits[i].to(y_norm[i].device), counts=False)
            sums[i, :-1] = c.to(self.device)
        sums = _all_reduce(sums).cpu()  # [layers, K+2]: CETT sums at the grid, then the guide token count
        return CETTCurve(grid, (sums[:, :-1] / sums[:, -1:].clamp_min(1)).float())

    def _limits_of_layer(self, i: int, eps: torch.Tensor) -> torch.Tensor:
        """:meth:`_limits` of one layer, ``eps [1, M]`` (host) -> ``[M, d_ff]`` on the device: the same values."""
        lim = compare_limits(activation_limits(self.host_col_norms[i], eps[0]), self._act_dtype[i])
        return host_to_device(lim.to(self._act_dtype[i]), self.device)  # exact: the values are of that dtype

    def _limits(self, eps: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's limits on ``|a|`` for thresholds ``eps [layers, M]`` (host):
        :func:`~sparsing_utils.cett.activation_limits` made comparable in the activations' own dtype
        (:func:`~sparsing_utils.cett.compare_limits`), computed on the host and copied to the device
        in one transfer: ``[M, d_ff]`` per layer."""
        if self._stacked_col_norms is not None:  # every layer alike: one set of host operations, one dtype
            lim = compare_limits(activation_limits(self._stacked_col_norms, eps), self._act_dtype[0])  # [L, M, d_ff]
            dev = host_to_device(lim.to(self._act_dtype[0]), self.device)  # exact: the values are of that dtype
            return list(dev.view(len(self.sites), eps.shape[1], -1))  # [M, d_ff] per layer, no kernel
        flat = [compare_limits(activation_limits(cn, eps[i]), self._act_dtype[i]).float().reshape(-1)
                for i, cn in enumerate(self.host_col_norms)]  # float32 holds every bf16/fp16 value exactly
        dev = host_to_device(torch.cat(flat), self.device)
        out, start = [], 0
        for i, f in enumerate(flat):
            out.append(dev[start:start + f.numel()].view(eps.shape[1], -1).to(self._act_dtype[i]))
            start += f.numel()
        return out

    def _sketch_projections(self) -> dict[int, torch.Tensor]:
        """Every layer's :func:`~sparsing_utils.cett.sketch_projection` (seed: the layer index) on
        the device, copied in one transfer; layers not sketched (``sketch_dim >= d_model``) have none."""
        shapes = {s.index: (s.weight_t().shape[1], self.sketch_dim) for s in self.sites
                  if self.sketch_dim < s.weight_t().shape[1]}
        if not shapes:
            return {}
        flat = host_to_device(torch.cat([sketch_projection(*shape, seed=i).reshape(-1) for i, shape in shapes.items()]),
                              self.device)
        out, start = {}, 0
        for i, (d_model, dim) in shapes.items():
            out[i] = flat[start:start + d_model * dim].view(d_model, dim)
            start += d_model * dim
        return out

    def _cett_sums(self, eps: torch.Tensor, todo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact CETT sums at per-layer thresholds ``eps [layers, M]`` for the layers in
        ``todo [layers]``: ``(cett_sum [layers, M], tokens [layers, 1])`` (float64, CPU,
        all-reduced: one collective). Reads the stored activations when there are some (memory
        mode, before :meth:`release`); otherwise runs a dense pass and accumulates inside the hooks.
        Every layer sees every real token, so ``tokens`` is the probe's token count."""
        layers, m = eps.shape
        parts: list[list[torch.Tensor]] = [[] for _ in range(layers)]  # [M] float64 sums per batch, per layer
        self.cett_evaluations += 1
        limits = self._limits(eps)  # one copy for all layers, before any hook runs

        def add(site: FFNSite, a: torch.Tensor | ExpertRows, y_norm: torch.Tensor) -> None:  # a [tokens, d_ff]
            i = site.index
            c, _ = cett_statistics(a, site.weight_t().detach(), self.col_norms[i], eps[i], y_norm,
                                   blocks=site.expert_blocks, limits=limits[i].to(y_norm.device), counts=False)
            parts[i].append(c.to(self.device))

        todo = todo.tolist()
        needed = {s.index for s in self.sites if todo[s.index]}  # todo as Python bools: no per-layer read
        if self._acts is not None:
            for site in self.sites:
                if site.index in needed:
                    add(site, self._acts[site.index], self._ynorm[site.index])
        else:
            rows = TokenRows()
            seen: set[int] = set()
            batch = [-1]

            def read(site: FFNSite, a: torch.Tensor | ExpertRows, y: torch.Tensor):
                if rows.start != batch[0]:  # a new batch
                    batch[0] = rows.start
                    seen.clear()
                if site.index in needed:
                    add(site, rows(a), l2_norm(rows(y)))
                    seen.add(site.index)
                    if len(seen) == len(needed):  # the layers after the last one needed are not run
                        raise _EnoughLayers

            with read_activations(self.model, read, sites=self.sites, with_output=True, compact=True):
                self._run(f"CETT statistics ({self.name})", rows, compute_loss=False)
            self.dense_passes += 1
        zero = torch.zeros(m, dtype=torch.float64, device=self.device)
        cett_sum = _all_reduce(torch.stack([torch.stack(p).sum(dim=0) if p else zero for p in parts]))  # [layers, M]
        tokens = torch.full((layers, 1), float(max(1, self.n_tokens)), dtype=torch.float64)
        return cett_sum.cpu(), tokens

    def layer_cett(self, eps: torch.Tensor) -> torch.Tensor:
        """Exact mean CETT of each layer at thresholds ``eps [layers]`` on all tokens."""
        self.prepare()
        if self.calibration is not None:
            return self.calibration.layer_cett(eps)
        s, t = self._cett_sums(eps.reshape(-1, 1).float(), torch.ones(len(self.sites), dtype=torch.bool))
        return (s / t).squeeze(1).float()

    def exact_curve(self, layers: Sequence[int] | None = None, eps: torch.Tensor | None = None) -> CETTCurve:
        """Each layer's *exact* mean CETT (Eq. 2, on all tokens) on a grid of thresholds, unlike
        :attr:`curve` (estimated on the first ``curve_tokens`` tokens through a sketch of ``W_down``).

        ``eps [layers, K]`` defaults to the grid of :attr:`curve`; only ``layers`` (default: all)
        are computed, the other rows of the returned curve's ``cett`` are NaN. One product of
        ``K`` masked copies of ``a`` per computed layer (memory mode: no forward pass).
        """
        self.prepare()
        if self.calibration is not None:
            return self.calibration.exact_curve(layers, eps)
        grid = (self.curve.eps if eps is None else torch.as_tensor(eps, dtype=torch.float32)).clone()  # [L, K]
        if grid.dim() != 2 or grid.shape[0] != len(self.sites):
            raise ValueError(f"eps must be [layers={len(self.sites)}, K] thresholds, got {tuple(grid.shape)}")
        todo = torch.zeros(len(self.sites), dtype=torch.bool)
        chosen = range(len(self.sites)) if layers is None else list(layers)
        for i in chosen:
            if not 0 <= i < len(self.sites):
                raise ValueError(f"layer {i} does not exist: the model has layers 0..{len(self.sites) - 1}")
            todo[i] = True
        s, t = self._cett_sums(grid, todo)
        cett = torch.where(todo.unsqueeze(1), s / t, torch.full_like(s, math.nan)).float()  # [L, K]
        return CETTCurve(grid, cett)

    def thresholds_for(self, c: float, *, exact: bool = True, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer thresholds whose mean CETT is ``c``: ``(eps [layers], cett [layers])``.

        ``exact=False`` interpolates the CETT curve (its CETT column is then ``c``, an
        estimate); ``exact=True`` refines on all tokens until every layer is within ``tol``.
        Every exact evaluation is kept and merged into the curve, so later targets near
        earlier ones start from a close guess and usually need a single check.
        """
        self.prepare()
        if self.calibration is not None:
            return self.calibration.thresholds_for(c, exact=exact, tol=tol)
        if not exact:
            eps = interpolate_thresholds(self._known_curve(), c)
            return eps, torch.full_like(eps, float(c))
        key = round(float(c), 12)
        if key in self._threshold_cache:
            return self._threshold_cache[key]
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def evaluate(eps: torch.Tensor, active: torch.Tensor) -> torch.Tensor:  # [layers] -> [layers]
            active = active.cpu()
            s, t = self._cett_sums(eps.reshape(-1, 1), active)
            cett = (s / t).squeeze(1)
            seen.append((torch.where(active, eps.cpu(), torch.nan), torch.where(active, cett.float(), torch.nan)))
            return cett

        if self._refine_inside_hooks():
            eps, cett = self._refine_in_one_pass(float(c), tol, seen)
        else:
            eps, cett, _ = refine_thresholds(evaluate, self._known_curve(), float(c), tol=tol)
        self._exact_points.extend(seen)
        self._threshold_cache[key] = (eps, cett)
        return eps, cett

    def _refine_inside_hooks(self) -> bool:
        """Without stored activations (stream mode, or after :meth:`release`), on one process, with
        every block in one batch: each layer's hook sees all of its tokens at once, so it can run the
        whole refinement of its threshold there (issue 10: one dense pass per target instead of one
        per round of evaluations)."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        return self._acts is None and not distributed and self.input_ids.shape[0] <= self.batch_size

    def _refine_in_one_pass(self, c: float, tol: float,
                            seen: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~sparsing_utils.cett.refine_thresholds` of every layer inside the hooks of one dense
        pass stopped after the last layer. Each layer's refinement reads only its own curve and
        evaluations, so its steps (:func:`~sparsing_utils.cett.refine_steps`, one generator per layer)
        are those of the batched refinement (the same thresholds and CETT, bitwise); ``seen`` receives
        the evaluations as the batched rounds would (one ``[layers]`` column per round, NaN for the
        layers already done).

        Pipelined (issue 10): a layer's hook launches the layer's first evaluation, then takes one step
        for every earlier layer still refining, whose last evaluation was launched at an earlier hook;
        the host waits for that evaluation's result only (:class:`~sparsing_utils.cett.PendingCopy`),
        while the device runs the forward queued after it. A layer still refining
        :data:`PIPELINE_LAYERS` hooks later finishes there (at most that many more layers' activations are
        held than before); those still refining after the last hook finish in rounds, all of them per round."""
        curve = self._known_curve()
        found: dict[int, tuple[torch.Tensor, torch.Tensor, list]] = {}
        refining: dict[int, dict] = {}  # layer -> its steps, activations and last evaluation in flight
        rows = TokenRows()
        tokens = float(max(1, self.n_tokens))

        def launch(i: int, state: dict, eps: torch.Tensor) -> None:  # one exact evaluation, read later
            e = eps.reshape(1).float().cpu()
            limits = self._limits_of_layer(i, e.reshape(1, 1)).to(state["yn"].device)  # [1, d_ff]
            total, _ = cett_statistics(state["a"], state["w_t"], self.col_norms[i], e, state["yn"],
                                       blocks=state["blocks"], limits=limits, counts=False)
            state["eps"], state["pending"] = e, PendingCopy(total.reshape(1))

        def step(i: int) -> None:  # read layer i's last evaluation; launch its next one or finish
            state = refining[i]
            cett = state["pending"].get() / tokens  # float64, as _cett_sums' sums / token count
            state["points"].append((state["eps"], cett.float()))
            try:
                eps, _ = state["steps"].send(cett)
            except StopIteration as done:
                eps, cett, _ = done.value
                found[i] = (eps, cett, state["points"])
                del refining[i]
                return
            launch(i, state, eps)

        def read(site: FFNSite, a: torch.Tensor | ExpertRows, y: torch.Tensor):
            i = site.index
            av = rows(a)  # [tokens, d_ff]; an MoE layer's sorted (CUDA: padded) once here, not in each evaluation
            state = {"a": av.with_row_padding() if isinstance(av, ExpertRows) else av, "yn": l2_norm(rows(y)),  # [tokens]
                     "w_t": site.weight_t().detach(),
                     "blocks": site.expert_blocks, "points": [],
                     "steps": refine_steps(CETTCurve(curve.eps[i:i + 1], curve.cett[i:i + 1]), c, tol=tol)}
            eps, _ = next(state["steps"])
            launch(i, state, eps)
            for j in list(refining):  # the earlier layers: one step each
                step(j)
                while j in refining and i - j >= PIPELINE_LAYERS:  # finished here: bounded memory
                    step(j)
            refining[i] = state
            if len(found) + len(refining) == len(self.sites):  # the rest of the forward is not needed
                raise _EnoughLayers

        with read_activations(self.model, read, sites=self.sites, with_output=True, compact=True):
            self._run(f"CETT statistics ({self.name})", rows, compute_loss=False)
        self.dense_passes += 1
        while refining:  # the last layers' remaining steps, a round at a time
            for j in list(refining):
                step(j)
        rounds = max(len(found[s.index][2]) for s in self.sites)
        self.cett_evaluations += rounds
        nan = torch.tensor([math.nan])
        for r in range(rounds):  # the columns the batched rounds record
            pts = [found[s.index][2] for s in self.sites]
            seen.append((torch.cat([p[r][0] if r < len(p) else nan for p in pts]),
                         torch.cat([p[r][1] if r < len(p) else nan for p in pts])))
        eps = torch.cat([found[s.index][0] for s in self.sites])
        cett = torch.cat([found[s.index][1] for s in self.sites])
        return eps, cett

    def _known_curve(self) -> CETTCurve:
        """The subsample curve plus every exact (all-token) evaluation made so far."""
        if not self._exact_points:
            return self.curve
        e = torch.stack([p[0] for p in self._exact_points], dim=1)  # [layers, M]
        c = torch.stack([p[1] for p in self._exact_points], dim=1)
        # Layers not evaluated at a point repeat a grid point (no information added).
        missing = torch.isnan(e)
        e = torch.where(missing, self.curve.eps[:, :1].expand_as(e), e)
        c = torch.where(missing, self.curve.cett[:, :1].expand_as(c), c)
        return self.curve.add_points(e, c)

    def sparse_pass(self, rule: SparsityRule, *, per_token: bool = True) -> PassStats:
        """Run the model with ``rule`` applied: PPL and activation ratios (padding excluded)."""
        self.prepare()
        layers = len(self.sites)
        active = torch.zeros(layers, dtype=torch.float64, device=self.device)
        local_tokens = int(self.attention_mask.sum())
        per_tok = torch.zeros(layers, local_tokens, dtype=torch.float32, device=self.device) if per_token else None
        moe = any(s.moe is not None for s in self.sites)
        ran = torch.zeros(layers, dtype=torch.float64, device=self.device)  # MoE: neurons of the experts that ran
        rows = TokenRows()

        def count(site: FFNSite, n: torch.Tensor):  # n [batch, seq]: activated neurons of each token
            counts = rows(n).to(self.device)  # [tokens]
            if per_tok is not None:  # the counts themselves (a copy): summed and scaled after the pass
                per_tok[site.index, rows.start:rows.stop] = counts
            else:
                active[site.index] += counts.sum(dtype=torch.float64)
            if moe:
                ran[site.index] += rows(site.ran_neurons(n.unsqueeze(-1))).to(self.device).sum(dtype=torch.float64)

        # NaN/inf shows in the loss, which _run checks: no per-layer synchronisation here.
        token_nll: list[torch.Tensor] = []
        with apply_rule(self.model, rule, sites=self.sites, count=count, check_finite=False,
                        col_norms=self.col_norms, host_col_norms=self.host_col_norms):
            nll, count = self._run(f"sparse pass ({self.name})", rows, token_nll=token_nll)
        self.sparse_passes += 1
        if per_tok is not None:
            active = per_tok.double().sum(dim=1)  # [layers] integer counts: exact in any order
        active, ran = _all_reduce(torch.stack([active, ran])).cpu()  # one collective, one copy to the host
        d_ff = torch.tensor([s.d_ff for s in self.sites], dtype=torch.float64)
        layer_active = (active / (self.n_tokens * d_ff)).float()
        layer_ran = (active / ran.clamp_min(1)).float() if moe else None
        token_active = None
        if per_tok is not None:  # [layers, tokens] activated fraction, scaled on the host
            token_active = (per_tok.cpu() / d_ff.float().unsqueeze(1)).half()
        return PassStats(nll, count, layer_active, token_active, layer_ran, token_nll=torch.cat(token_nll).float().cpu())

    def gate_histogram(self, tokens: int = 1024) -> NormHistogram:
        """Histogram of every layer's gate scores ``|act(W_gate x)|`` (``|a|`` for plain FFNs: the
        score of the FAT and Top-k baselines) on about ``tokens`` real tokens chosen as the guide
        curves' are (:func:`curve_token_mask`): every ``s``-th real token of every block, ``s =
        ceil(all real tokens / tokens)`` capped by the shortest block, so that every split of the
        blocks over processes histograms the same global subset (all tokens when ``tokens`` covers
        them). One dense forward over this process's blocks, stopped after the last FFN (no LM
        head); integer counts, all-reduced under ``torch.distributed``: the same histogram for any split."""
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens!r}")
        real = self.attention_mask.sum(dim=1)
        real = real[real > 0]
        shortest = _all_reduce_min(torch.tensor([float(real.min()) if len(real) else math.inf], dtype=torch.float64,
                                                device=self.device)).item()
        stride = max(1, int(min(math.ceil(self.n_tokens / tokens), shortest)))
        chosen = curve_token_mask(self.attention_mask, stride)[self.attention_mask.bool()]  # [local real tokens]
        by_batch = self._guide_rows_by_batch(chosen) if stride > 1 else None
        hist = NormHistogram(len(self.sites), device=self.device)
        rows = TokenRows()
        seen: set[int] = set()
        batch = [-1]

        def read(site: FFNSite, a, gate) -> None:  # a is not changed; gate [batch, seq, d_ff] (MoE: ExpertRows)
            if rows.start != batch[0]:  # a new batch
                batch[0] = rows.start
                seen.clear()
            g = rows(gate)  # [tokens, d_ff]
            if by_batch is not None:
                g = _take(g, by_batch[rows.start, rows.stop])  # [chosen tokens, d_ff]
            _histogram_add(hist, site.index, g, self.device)
            seen.add(site.index)
            if len(seen) == len(self.sites):  # every layer read: the LM head is not needed
                raise _EnoughLayers

        with edit_activations(self.model, read, sites=self.sites, need_gate=True, compact=True):
            self._run(f"gate scores ({self.name})", rows, compute_loss=False)
        self.dense_passes += 1
        hist.all_reduce()
        return hist

    def activations(self, layer: int) -> torch.Tensor:
        """The stored dense activations ``a`` of one layer, ``[tokens, d_ff]`` (memory mode; an MoE
        layer's are stored per expert and built here at full width, zeros for experts that did not run)."""
        self.prepare()
        if self._acts is None:
            raise ValueError("activations are kept only in memory mode (mode='memory'), before release()")
        a = self._acts[layer]
        return a.full() if isinstance(a, ExpertRows) else a

    @property
    def stored_bytes(self) -> int:
        """Bytes of the activations kept (memory mode; 0 after :meth:`release` or in stream mode)."""
        return sum(a.nbytes if isinstance(a, ExpertRows) else a.numel() * a.element_size() for a in self._acts or [])

    def release(self) -> None:
        """Drop the stored activations (memory mode). Later exact CETT statistics (e.g. a
        :meth:`thresholds_for` target not computed yet) rerun the dense pass, as stream mode does."""
        self._acts = self._ynorm = None
