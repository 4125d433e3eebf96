"""Sine position encodings of feature maps (DETR family)."""
import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-d sine encoding of a feature map from its padding mask.

    Returns (B, 2 * num_pos_feats, h, w) with the y half first. With normalize=True the cumulative
    coordinates of the valid region are rescaled to (0, scale], shifted by `offset` first
    (Deformable-DETR uses offset -0.5). The temperature differs by family: 10000 for Conditional and
    Deformable-DETR, 20 for DAB/DN-DETR.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=2 * math.pi,
                 offset=0.0, eps=1e-6):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.normalize, self.scale, self.offset, self.eps = normalize, scale, offset, eps

    def forward(self, mask, dtype=torch.float32):
        """mask (B, h, w) True at padding. Computed in float32 (as detrex) unless `dtype` asks
        for more (a float64 model in numerical checks)."""
        not_mask = ~mask
        y = not_mask.cumsum(1, dtype=dtype)
        x = not_mask.cumsum(2, dtype=dtype)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=dtype, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x[..., None] / dim_t
        pos_y = y[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
