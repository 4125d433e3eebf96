"""Attention with dropout on CPU: the explicit map computed whole against in cache-sized chunks.

    python -m experiments.benchmarks.attention_chunks [--repeats 9] [--threads N] [--dropout 0.1]

With dropout on CPU, models.layers.attend computes the attention map (B, heads, Nq, Nk) itself, in
chunks of whole (image, head) maps of at most EXPLICIT_MAP_CHUNK_BYTES. For each shape below (the
decoder self-attention of a training batch of 2 images and of the KS rows' 3 branches x 2 images, the
standard-attention encoder at 800 x 1216 px: 25 x 38 tokens), this times `attend`'s forward +
backward with the chunking (as built) and with one chunk (the whole map), interleaved, and prints
the medians and their ratio, all measured in this one run. Both give the same bits (the chunks are
taken in memory order); the run checks that too.
"""
import argparse
from unittest import mock

import torch

from experiments.benchmarks import interleaved_medians
from models import layers

# (name, batch, heads, queries, keys, head dim)
SHAPES = (
    ("decoder self-attention, 2 images", 2, 8, 300, 300, 32),
    ("decoder self-attention, 3 branches x 2 images", 6, 8, 300, 300, 32),
    ("encoder, 2 images at 800 x 1216 (950 tokens)", 2, 8, 950, 950, 32),
)
WHOLE = 1 << 62  # a chunk budget that holds any map


def step(q, k, v, dropout_p, budget, seed=0):
    """attend's forward + backward with the chunk budget `budget`; returns (output, gradients)."""
    with mock.patch.object(layers, "EXPLICIT_MAP_CHUNK_BYTES", budget):
        torch.manual_seed(seed)
        out = layers.attend(q, k, v, None, dropout_p)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    return out, grads


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.benchmarks.attention_chunks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9, help="timed calls per variant (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on the map (default: %(default)s; > 0)")
    args = p.parse_args(argv)
    if not args.dropout > 0:
        p.error("--dropout must be > 0: without dropout attend calls SDPA and computes no map")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, forward + backward, "
          f"medians of {args.repeats} interleaved calls, chunks of at most {layers.EXPLICIT_MAP_CHUNK_BYTES / 2**20:g} MiB")
    for name, batch, heads, nq, nk, dh in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, n, dh, generator=g, requires_grad=True) for n in (nq, nk, nk))
        chunks = len(layers.map_chunks(batch, heads, nq * nk * 4))
        chunked, whole = step(q, k, v, args.dropout, layers.EXPLICIT_MAP_CHUNK_BYTES), step(q, k, v, args.dropout, WHOLE)
        same = all(torch.equal(a, b) for a, b in zip((chunked[0], *chunked[1]), (whole[0], *whole[1])))
        t = interleaved_medians({"chunked": lambda: step(q, k, v, args.dropout, layers.EXPLICIT_MAP_CHUNK_BYTES),
                                 "whole": lambda: step(q, k, v, args.dropout, WHOLE)}, args.repeats)
        print(f"  {name} ({batch} x {heads} maps of {nq} x {nk}, {chunks} chunks): whole {t['whole'] * 1e3:7.1f} ms, "
              f"chunked {t['chunked'] * 1e3:7.1f} ms = {t['chunked'] / t['whole']:.2f}x; "
              f"{'the same bits' if same else 'NOT the same bits'}", flush=True)


if __name__ == "__main__":
    main()
