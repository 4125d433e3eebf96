"""Cost of the KS triple-attention layer against a plain encoder layer (forward + backward).

    python -m benchmarks.triple_attention [--tokens 64 --batch 2 --d-model 256 --repeats 3]

Prints the time per call of each implementation and its ratio to the plain layer, all measured in
this one run. The layer as built (models.ks_encoder.KSEncoderLayer) computes A [V | V^t] in one SDPA
call with q/k zero-padded to the doubled head dim; the alternative below passes the unequal head dims
to SDPA directly. Because the out-projection, norms and FFN run once per branch, about 3x the plain
layer is the floor for the whole triple layer.
"""
import argparse
from unittest import mock

import torch

from benchmarks import mean_seconds, print_ratios
from models import ks_encoder
from models.layers import EncoderLayer, attend


def unequal_head_dims(q, k, v, vt, mask, dropout_p):
    """A [V | V^t] with q/k head dim dh and value head dim 2 dh (SDPA's slow path)."""
    dh = q.shape[-1]
    y = attend(q, k, torch.cat([v, vt], -1), mask, dropout_p)
    return y[..., :dh], y[..., dh:]


def time_layer(layer, x, pos, pad, fg, repeats):
    def step():
        layer.zero_grad(set_to_none=True)
        out = layer(x, pos, pad) if fg is None else layer(x, pos, pad, fg)
        out = out if fg is None else torch.cat([out[0], *out[1].values()])
        out.square().mean().backward()

    return mean_seconds(step, repeats, x.device)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64, help="token grid side (tokens = side^2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    B, N, d = args.batch, args.tokens ** 2, args.d_model
    x = torch.randn(B, N, d, device=dev, requires_grad=True)
    pos = torch.randn(B, N, d, device=dev)
    pad = torch.zeros(B, N, dtype=torch.bool, device=dev)
    pad[-1, -N // 4:] = True  # one padded image, as in a real batch
    fg = (torch.rand(B, N, device=dev) < 0.3) & ~pad
    layer_args = (d, args.heads, args.ffn, args.dropout, "relu")

    plain = EncoderLayer(*layer_args).to(dev).train()
    triple = ks_encoder.KSEncoderLayer("triple", *layer_args).to(dev).train()
    results = {"plain layer": time_layer(plain, x, pos, pad, None, args.repeats)}
    results["triple, as built (q/k zero-padded)"] = time_layer(triple, x, pos, pad, fg, args.repeats)
    with mock.patch.object(ks_encoder, "attend_shared_map", unequal_head_dims):
        results["triple, unequal head dims"] = time_layer(triple, x, pos, pad, fg, args.repeats)
    for mode in ("dual_share_v", "dual_share_a"):
        layer = ks_encoder.KSEncoderLayer(mode, *layer_args).to(dev).train()
        results[f"{mode}, as built"] = time_layer(layer, x, pos, pad, fg, args.repeats)

    print(f"device {dev}, batch {B}, tokens {N} ({args.tokens}x{args.tokens}), d {d}, heads {args.heads}, "
          f"ffn {args.ffn}, forward + backward, mean of {args.repeats}")
    print_ratios(results, "plain layer", "  {name:38s} {ms:9.1f} ms  {ratio:5.2f}x plain")


if __name__ == "__main__":
    main()
