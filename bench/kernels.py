"""Kernel micro-benchmarks: each kernel against its torch reference, as a table.

On CUDA the Triton kernels and the reference are timed with triton.testing.do_bench (median
ms). On CPU the second column is the C kernels (gateway.kernels.cpu_ops, the CPU backend),
timed as the median of --reps calls, and the table gains one prefill_attention_into row per
--prefill-chunks entry (one layer's prefill attention over the paged cache). With --interpret
the CPU column is instead the Triton kernels under TRITON_INTERPRET=1, timed once, labelled
"interpreter": that column measures the Python interpreter, not the kernel. Side effects:
sets TRITON_INTERPRET before importing the kernels when --interpret is given; compiles the C
kernels on first use; allocates the benchmark tensors; prints the table.

    python bench/kernels.py                       # CUDA if available, else CPU: C vs reference
    python bench/kernels.py --batch 64 --context 2048 --dtype bf16
    python bench/kernels.py --device cpu --interpret --batch 2 --context 64 --prefill-len 32
    # SmolLM2-135M shapes on CPU: decode batch 64 x 300, prefill chunks with and without a prefix
    python bench/kernels.py --device cpu --dtype bf16 --heads 9 --kv-heads 3 --head-dim 64 --hidden 576 \
        --intermediate 1536 --batch 64 --context 300 --prefill-chunks 128+0,1024+0,512+1536
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--interpret", action="store_true", help="CPU: also run Triton under the interpreter")
    p.add_argument("--batch", type=int, default=None, help="decode sequences (default 64 CUDA / 8 CPU)")
    p.add_argument("--context", type=int, default=None, help="decode context length (2048 / 256)")
    p.add_argument("--prefill-seqs", type=int, default=None, help="prefill sequences (4 / 1)")
    p.add_argument("--prefill-len", type=int, default=None, help="prefill chunk length (1024 / 128)")
    p.add_argument("--prefix-len", type=int, default=0, help="cached prefix before each chunk")
    p.add_argument("--prefill-chunks", default="128+0,1024+0,512+1536",
                   help="CPU: prefill_attention_into rows, one single-sequence chunk per QUERY+PREFIX entry")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=10, help="CPU timing repetitions")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU torch threads (on a busy machine 1 avoids OpenMP barrier stalls)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.device == "cuda"
    for name, on_gpu, on_cpu in [("batch", 64, 8), ("context", 2048, 256), ("prefill_seqs", 4, 1),
                                 ("prefill_len", 1024, 128)]:
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    args.dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    return args


def make_metadata(seqs, num_decodes, block_size, device):
    """Flat-batch metadata for [(query_len, context_len)], decodes first, shuffled blocks."""
    from gateway.kernels.metadata import AttentionMetadata
    blocks = [-(-ctx // block_size) for _, ctx in seqs]
    order = torch.randperm(sum(blocks))
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    starts, used = [0], 0
    for i, ((query_len, _), nb) in enumerate(zip(seqs, blocks)):
        tables[i, :nb] = order[used:used + nb]
        used += nb
        starts.append(starts[-1] + query_len)
    lens = [ctx for _, ctx in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(starts[-1], device=device), block_tables=tables.to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        max_query_len=max(q for q, _ in seqs), max_seq_len=max(lens), num_decodes=num_decodes,
        query_start_loc_cpu=starts, seq_lens_cpu=lens)
    return meta, sum(blocks)


def attention_case(args, seqs, num_decodes):
    meta, num_blocks = make_metadata(seqs, num_decodes, args.block_size, args.device)
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device=args.device).to(args.dtype)
    v_cache = torch.randn(shape, device=args.device).to(args.dtype)
    num_tokens = meta.query_start_loc_cpu[-1]
    q = torch.randn(num_tokens, args.heads, args.head_dim, device=args.device).to(args.dtype)
    kv_bytes = 2 * sum(c for _, c in seqs) * args.kv_heads * args.head_dim * k_cache.element_size()
    call = lambda ops: ops.paged_attention(q, k_cache, v_cache, meta, args.head_dim ** -0.5)  # noqa: E731
    return call, kv_bytes + 2 * q.numel() * q.element_size()


def prefill_chunk_case(args, query_len: int, prefix_len: int):
    """One layer's prefill attention for a single chunk: prefill_attention_into(out, ...)."""
    meta, num_blocks = make_metadata([(query_len, prefix_len + query_len)], 0, args.block_size, args.device)
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device=args.device).to(args.dtype)
    v_cache = torch.randn(shape, device=args.device).to(args.dtype)
    q = torch.randn(query_len, args.heads, args.head_dim, device=args.device).to(args.dtype)
    out = torch.empty_like(q)
    scale = args.head_dim ** -0.5
    kv_bytes = 2 * (prefix_len + query_len) * args.kv_heads * args.head_dim * k_cache.element_size()
    return (lambda ops: ops.prefill_attention_into(out, q, k_cache, v_cache, meta, scale),  # noqa: E731
            kv_bytes + 2 * q.numel() * q.element_size())


def build_cases(args) -> list[tuple[str, str, object, int]]:
    """(name, shape, call(ops), bytes moved) for every kernel."""
    dev, dt = args.device, args.dtype
    t = args.batch
    esz = torch.tensor([], dtype=dt).element_size()
    x, res = torch.randn(t, args.hidden, device=dev).to(dt), torch.randn(t, args.hidden, device=dev).to(dt)
    w = torch.ones(args.hidden, device=dev, dtype=dt)
    gate_up = torch.randn(t, 2 * args.intermediate, device=dev).to(dt)
    q = torch.randn(t, args.heads, args.head_dim, device=dev).to(dt)
    k = torch.randn(t, args.kv_heads, args.head_dim, device=dev).to(dt)
    cos_sin = torch.randn(8192, args.head_dim, device=dev)
    pos = torch.randint(0, 8192, (t,), device=dev)
    cache_shape = (-(-t // args.block_size), args.block_size, args.kv_heads, args.head_dim)
    caches = [torch.zeros(cache_shape, device=dev, dtype=dt) for _ in range(2)]
    slots = torch.randperm(t, device=dev)
    decode, decode_bytes = attention_case(args, [(1, args.context)] * args.batch, args.batch)
    chunk = (args.prefill_len, args.prefix_len + args.prefill_len)
    prefill, prefill_bytes = attention_case(args, [chunk] * args.prefill_seqs, 0)
    heads = f"H{args.heads}/{args.kv_heads}"
    chunk_rows = []
    if args.device == "cpu" and not args.interpret:
        for spec in filter(None, args.prefill_chunks.split(",")):
            query_len, prefix_len = (int(x) for x in spec.split("+"))
            call, nbytes = prefill_chunk_case(args, query_len, prefix_len)
            chunk_rows.append(("prefill_attention_into", f"{query_len}+{prefix_len} {heads} D{args.head_dim}",
                               call, nbytes))
    return chunk_rows + [
        ("paged_attention decode", f"{args.batch}x{args.context} {heads}", decode, decode_bytes),
        ("paged_attention prefill", f"{args.prefill_seqs}x{chunk[0]}+{args.prefix_len} {heads}",
         prefill, prefill_bytes),
        ("store_kv", f"T{t}", lambda ops: ops.store_kv(k, k, *caches, slots), 4 * k.numel() * esz),
        ("rms_norm", f"T{t} N{args.hidden}", lambda ops: ops.rms_norm(x, w, 1e-6), 2 * x.numel() * esz),
        ("fused_add_rms_norm", f"T{t} N{args.hidden}",
         lambda ops: ops.fused_add_rms_norm(x, res, w, 1e-6), 4 * x.numel() * esz),
        ("silu_and_mul", f"T{t} I{args.intermediate}", lambda ops: ops.silu_and_mul(gate_up),
         3 * gate_up.numel() // 2 * esz),
        ("rotary_embedding", f"T{t} {heads}",
         lambda ops: ops.rotary_embedding(pos, q, k, cos_sin), 2 * (q.numel() + k.numel()) * esz),
    ]


def time_cpu(fn, reps: int) -> float:
    fn()    # warm-up: first-call allocations, lazy imports
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"     # must precede the kernels' decoration
    from gateway.kernels import reference
    gpu = args.device == "cuda"
    if gpu or args.interpret:
        from gateway.kernels import triton_ops as other
        label = "triton ms" if gpu else "interpreter ms (NOT perf)"
    else:
        from gateway.kernels import cpu_ops as other
        label = "C ms" if other.available() else "C ms (no compiler: torch)"
    real = gpu or not args.interpret          # the second column is a kernel's real time
    cases = build_cases(args)
    print(f"device={args.device} dtype={str(args.dtype).removeprefix('torch.')} "
          f"threads={torch.get_num_threads()}")
    print(f"{'kernel':<24}{'shape':<26}{'reference ms':>14}{label:>27}{'speedup':>9}{'GB/s':>13}")
    for name, shape, call, nbytes in cases:
        if gpu:
            import triton.testing
            ref_ms = triton.testing.do_bench(lambda: call(reference), return_mode="median")
            new_ms = triton.testing.do_bench(lambda: call(other), return_mode="median")
        else:
            ref_ms = time_cpu(lambda: call(reference), args.reps)
            new_ms = time_cpu(lambda: call(other), args.reps if real else 1)
        speedup = f"{ref_ms / new_ms:9.2f}" if real else f"{'-':>9}"
        bandwidth = f"{nbytes / new_ms / 1e6:13.1f}" if real else f"{'-':>13}"
        print(f"{name:<24}{shape:<26}{ref_ms:14.3f}{new_ms:27.3f}{speedup}{bandwidth}")


if __name__ == "__main__":
    main()
