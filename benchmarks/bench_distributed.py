"""The project's PPL-p% search with the token blocks split across processes (issue 4, item 5).

Launch with ``torchrun --nproc_per_node N``; rank ``r`` takes blocks ``r::N``, builds its
:class:`~sparsing_utils.probe.SparsityProbe` on that shard, and every sum of the search
(losses, token counts, norm histograms, CETT and activation sums) is all-reduced inside
``sparsing_utils.probe``, so all ranks follow the same search and reach the same answer, the
one a single process reaches on all blocks (the guide curves' tokens are chosen inside each
block, so they do not depend on the split either; issue 10).
Process group: ``nccl`` on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), ``gloo`` on CPU. Run
without ``torchrun`` it is the single-process search on all blocks (world size 1), the
baseline to compare with. Rank 0 prints the wall time and the result and writes ``--out``.

Usage::

    python benchmarks/bench_distributed.py --model llama-tiny --device cpu --out single.json
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --model llama-tiny --device cpu --out dist.json
    python benchmarks/bench_distributed.py --compare single.json dist.json

    # two H200s, the 836M configuration:
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --model llama836m --device cuda --out d2.json

The models and tokens are those of ``bench_search.py`` (same options); for ``--data self`` rank
0 samples the tokens and broadcasts them, so every world size sees the same blocks.
``--warmup`` runs one untimed dense forward of each rank's first batch before the clock starts
(CUDA kernels and cuBLAS handles are set up on first use, a fixed cost that does not shrink
with the number of GPUs); without it the time includes that first-call overhead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import bench_search as bs

from sparsing_utils.jsonio import atomic_write_json
from sparsing_utils.probe import SparsityProbe
from sparsing_utils.search import search_ppl_p


def log(rank: int, msg: str, *, all_ranks: bool = False) -> None:
    if rank == 0 or all_ranks:
        print(f"[{time.strftime('%H:%M:%S')} rank {rank}] {msg}", file=sys.stderr, flush=True)


def build(args, rank: int, world: int, device: torch.device):
    """``(model, all_blocks, info)``: every rank builds the model; the token ids are made on
    rank 0 (sampled or tokenised) and broadcast, so all ranks hold the same blocks."""
    dtype = bs._dtype(args.dtype, device, args.model)
    tokens, block_len = bs.DEFAULTS[args.model]
    tokens = args.tokens or tokens
    block_len = args.block_len or block_len
    n_blocks = max(1, tokens // block_len)
    info = {"model": args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "tokens": n_blocks * block_len, "block_len": block_len, "n_blocks": n_blocks, "world_size": world}
    if args.model == "smollm2":
        from sparsing_utils.blocks import make_blocks
        from sparsing_utils.models import load_model

        loaded = load_model("smollm2", dtype=info["dtype"], device=str(device))
        model = loaded.model
        ids = None
        if rank == 0:
            ids = make_blocks(loaded.tokenizer, args.text, tokens=n_blocks * block_len,
                              block_len=block_len).input_ids
        info["text"] = args.text
    else:
        init_std = args.init_std if args.init_std is not None else bs.INIT_STD[args.model]
        model, minfo = bs.random_llama(args.model, init_std=init_std, seed=args.seed, dtype=dtype, device=device,
                                       max_len=block_len)
        info["model_info"] = minfo
        ids = bs.make_ids(model, args, n_blocks, block_len, minfo["vocab"]) if rank == 0 else None
        info["data"] = args.load_ids or args.data
    if world > 1:
        comm_dev = device if device.type == "cuda" else torch.device("cpu")
        buf = ids.to(comm_dev, torch.long) if rank == 0 else torch.empty(n_blocks, block_len, dtype=torch.long,
                                                                         device=comm_dev)
        dist.broadcast(buf, src=0)
        ids = buf.cpu()
    blocks = SimpleNamespace(input_ids=ids, attention_mask=torch.ones_like(ids))
    return model, blocks, info


def shard(blocks, rank: int, world: int):
    idx = list(range(rank, blocks.input_ids.shape[0], world))
    return SimpleNamespace(input_ids=blocks.input_ids[idx], attention_mask=blocks.attention_mask[idx]), idx


def compare(a_path: str, b_path: str, *, c_rtol_same: float = 1e-6, eps_rtol_same: float = 1e-5,
            c_rtol: float = 1e-2, act_atol: float = 5e-3) -> bool:
    """Compare two result files (e.g. world sizes 1 and 2); True for the same answer.

    SAME: ``c`` within 1e-6 relative and every threshold within 1e-5 relative (what the order
    of float64 additions and of the model's own arithmetic can move; the search's tolerances
    are 1e-4 on a layer's CETT and ``tol`` on the PPL ratio). EQUIVALENT (reported, but not the
    same answer): both converged, ``c`` within 1% and activation ratios within 0.005. Else
    DIFFERENT.
    """
    with open(a_path) as f:
        a = json.load(f)
    with open(b_path) as f:
        b = json.load(f)
    ra, rb = a["result"], b["result"]
    dc = abs(ra["cett"] - rb["cett"]) / max(abs(ra["cett"]), 1e-30)
    deps = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(ra["thresholds"], rb["thresholds"]))
    dratio = abs(ra["ppl_ratio"] - rb["ppl_ratio"])
    dact = abs(ra["activation_ratio"] - rb["activation_ratio"])

    def pm(r: dict) -> str:
        u = r.get("activation_ratio_uncertainty")
        return "" if u is None else f" +- {u:.4f}"

    print(f"world sizes {a['config']['world_size']} vs {b['config']['world_size']}:")
    print(f"  c:                {ra['cett']:.9f} vs {rb['cett']:.9f} (rel diff {dc:.2e})")
    print(f"  thresholds:       max rel diff {deps:.2e}")
    print(f"  PPL ratio:        {ra['ppl_ratio']:.7f} vs {rb['ppl_ratio']:.7f} (diff {dratio:.1e})")
    print(f"  activation ratio: {ra['activation_ratio']:.6f}{pm(ra)} vs {rb['activation_ratio']:.6f}{pm(rb)} "
          f"(diff {dact:.1e})")
    print(f"  passes:           {a['dense_passes']} dense + {a['sparse_passes']} sparse vs "
          f"{b['dense_passes']} dense + {b['sparse_passes']} sparse")
    print(f"  wall time:        {a['wall_s']:.2f} s vs {b['wall_s']:.2f} s "
          f"(speed-up {a['wall_s'] / b['wall_s']:.2f}x)")
    if dc <= c_rtol_same and deps <= eps_rtol_same:
        print(f"  SAME ANSWER (c within {c_rtol_same:g}, thresholds within {eps_rtol_same:g}, relative)")
        return True
    if ra["converged"] and rb["converged"] and dc <= c_rtol and dact <= act_atol:
        print(f"  EQUIVALENT ANSWER, NOT THE SAME (both converged; c within {c_rtol:g}, activation within "
              f"{act_atol:g})")
        return False
    print("  DIFFERENT ANSWERS")
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="compare two result files and exit")
    bs.add_model_args(ap)
    ap.set_defaults(model="llama-tiny")
    ap.add_argument("--mode", choices=["memory", "stream"], default="memory")
    ap.add_argument("--p", type=float, default=1.0)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--curve-tokens", type=int, default=None,
                    help="SparsityProbe curve_tokens, over all ranks (default: the project's default)")
    ap.add_argument("--warmup", action="store_true",
                    help="one untimed dense forward of each rank's first batch before the clock starts")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.compare:
        return 0 if compare(*args.compare) else 1

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if args.threads:
            torch.set_num_threads(args.threads)
        elif world > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        model, blocks, info = build(args, rank, world, device)
        mine, idx = shard(blocks, rank, world)
        block_len = blocks.input_ids.shape[1]
        batch_size = args.batch_size or max(1, (32768 if device.type == "cuda" else 4096) // block_len)
        log(rank, f"world size {world}: {len(idx)} of {blocks.input_ids.shape[0]} blocks on this rank "
                  f"({device}, batch {batch_size}, mode {args.mode})", all_ranks=True)
        kw = {}
        curve_tokens = args.curve_tokens
        if curve_tokens is not None:
            kw["curve_tokens"] = curve_tokens
        if args.warmup:
            with torch.no_grad():
                model(input_ids=mine.input_ids[:batch_size].to(device),
                      attention_mask=mine.attention_mask[:batch_size].to(device), use_cache=False)
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        probe = SparsityProbe(model, mine, mode=args.mode, batch_size=batch_size, name=args.model, **kw)
        res = search_ppl_p(probe, args.p, tol=args.tol)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            dist.barrier()
        wall = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        if world > 1:
            t = torch.tensor([float(peak)], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            peak = int(t.item())
        if rank == 0:
            out = {"config": {**info, "batch_size": batch_size, "mode": args.mode, "p": args.p, "tol": args.tol,
                              "curve_tokens": curve_tokens, "warmup": args.warmup, "torch": torch.__version__},
                   "wall_s": wall, "peak_cuda_bytes_max_rank": peak if device.type == "cuda" else None,
                   "dense_passes": probe.dense_passes, "sparse_passes": probe.sparse_passes,
                   "result": res.to_dict()}
            out["result"].pop("token_activation_ratio", None)  # rank-local
            print(f"world size {world} ({device.type}): {wall:.2f} s, {probe.dense_passes} dense + "
                  f"{probe.sparse_passes} sparse passes")
            u = res.activation_ratio_uncertainty
            print(f"c = {res.cett:.9f}, activation ratio {res.activation_ratio:.6f}"
                  f"{'' if u is None else f' +- {u:.4f}'}, PPL ratio {res.ppl_ratio:.7f}"
                  f" (dense PPL {res.ppl_dense:.4f}), converged {res.converged} {res.message}")
            if device.type == "cuda":
                print(f"peak CUDA memory (max over ranks): {peak / 2**30:.2f} GiB")
            if args.out:
                atomic_write_json(args.out, json.loads(json.dumps(out, default=float)))
    finally:
        if world > 1 and dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; tearing gloo down early can abort a rank
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
