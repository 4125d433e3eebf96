"""Forward + backward time of the CUDA op against the PyTorch path, on one GPU.

    python -m models.ops.ms_deform_attn.benchmark [--batch 2] [--queries 0] [--dtype float32]

The default problem is the encoder self-attention of Deformable-DETR on an ~800x1200 image:
4 levels at strides 8-64, 8 heads of 32 channels, 4 points, every pixel a query (--queries 300
gives the decoder's cross-attention). Both paths run on the same inputs in the same process; the
ratio is from this one run.
"""
import argparse
import sys

import torch

from .extension import BUILD_COMMAND, extension_available, extension_load_error
from .function import ms_deform_attn, ms_deform_attn_pytorch

LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))


def make_problem(batch, queries, heads, channels, points, dtype, device):
    shapes = torch.tensor(LEVELS, dtype=torch.int64, device=device)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    Lq = queries or S
    value = torch.randn(batch, S, heads, channels, dtype=dtype, device=device)
    locations = torch.rand(batch, Lq, heads, len(LEVELS), points, 2, dtype=dtype, device=device)
    weights = torch.rand(batch, Lq, heads, len(LEVELS) * points, dtype=dtype, device=device)
    weights = weights.softmax(-1).view(batch, Lq, heads, len(LEVELS), points)
    grad_output = torch.randn(batch, Lq, heads * channels, dtype=dtype, device=device)
    return (value, shapes, starts, locations, weights), grad_output


def time_forward_backward(op, inputs, grad_output, warmup, iters):
    """(mean milliseconds of one forward + backward, peak GiB allocated during it)."""
    value, shapes, starts, locations, weights = (
        t.requires_grad_() if t.is_floating_point() else t for t in inputs)

    def step():
        for t in (value, locations, weights):
            t.grad = None
        op(value, shapes, starts, locations, weights).backward(grad_output)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, torch.cuda.max_memory_allocated() / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--queries", type=int, default=0, help="0: one query per pixel (encoder)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32, help="channels per head")
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "float64", "float16"], default="float32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("No CUDA GPU available: the benchmark compares the CUDA kernels with the PyTorch "
              "path on a GPU, so there is nothing to measure here.")
        return 0
    if not extension_available():
        print(f"The CUDA extension is not loaded ({extension_load_error()}). "
              f"Build it with: {BUILD_COMMAND}", file=sys.stderr)
        return 1

    dtype = getattr(torch, args.dtype)
    inputs, grad_output = make_problem(args.batch, args.queries, args.heads, args.channels,
                                       args.points, dtype, "cuda")
    N, S, M, D = inputs[0].shape
    Lq, L, P = inputs[3].shape[1], inputs[3].shape[3], inputs[3].shape[4]
    print(f"{torch.cuda.get_device_name()}, {args.dtype}: N={N} S={S} Lq={Lq} M={M} D={D} "
          f"L={L} P={P}; forward + backward, mean of {args.iters} after {args.warmup} warm-up")
    cuda_ms, cuda_gib = time_forward_backward(ms_deform_attn, inputs, grad_output, args.warmup,
                                              args.iters)
    print(f"  CUDA kernels   {cuda_ms:9.2f} ms   peak {cuda_gib:6.2f} GiB")
    pytorch_ms, pytorch_gib = time_forward_backward(ms_deform_attn_pytorch, inputs, grad_output,
                                                    args.warmup, args.iters)
    print(f"  PyTorch path   {pytorch_ms:9.2f} ms   peak {pytorch_gib:6.2f} GiB")
    print(f"  speed-up       {pytorch_ms / cuda_ms:9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
