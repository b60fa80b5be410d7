"""The adapters' function forms (Xiang et al. 2023, Sec. 3): small bottlenecks, zero-initialised
on their last layer so that attaching one leaves the UNet's output unchanged."""

from __future__ import annotations

import torch
from torch import nn


def _check_device(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.device != weight.device:
        raise RuntimeError(
            f"Adapter weights are on {weight.device} but the UNet runs on {x.device}: move the "
            "AdapterSet too (adapters.to(device)), or attach / load adapters after moving the UNet."
        )


def make_activation(name: str) -> nn.Module:
    """relu | sigmoid | silu | identity (AdapterConfig has already normalised the name)."""
    return {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU, "identity": nn.Identity}[
        name
    ]()


class TransformerAdapter(nn.Module):
    """x -> scale * up(act(down(x))): Linear(in_dim, r) -> activation -> Linear(r, out_dim).

    Per token on (B, T, in_dim). `pool_tokens` mean-pools the output over the T tokens to
    (B, 1, out_dim), which broadcasts over image tokens (the CA_c input feeding an image-token
    output). Runs in its own dtype and returns the caller's, so a float32 adapter can sit in a
    float16 UNet. `up` starts at zero: the adapter's output is exactly 0 until trained.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        rank: int,
        activation: str = "relu",
        scale: float = 1.0,
        pool_tokens: bool = False,
    ) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, rank)
        self.act = make_activation(activation)
        self.up = nn.Linear(rank, out_dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)
        self.pool_tokens = pool_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_device(x, self.down.weight)
        y = self.up(self.act(self.down(x.to(self.down.weight.dtype)))) * self.scale
        if self.pool_tokens:
            y = y.mean(dim=1, keepdim=True)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, pool_tokens={self.pool_tokens}"


class ResBlockAdapter(nn.Module):
    """x -> scale * up(act(down(SiLU(GroupNorm(x))))), down/up 3x3 convs C_in -> r -> C_out.

    The official code's ResBlock adapter: only the channel count changes, the spatial size is kept.
    `up` starts at zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        activation: str = "relu",
        scale: float = 1.0,
        num_groups: int = 32,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.nonlinearity = nn.SiLU()
        self.down = nn.Conv2d(in_channels, rank, kernel_size=3, padding=1)
        self.act = make_activation(activation)
        self.up = nn.Conv2d(rank, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_device(x, self.down.weight)
        h = self.nonlinearity(self.norm(x.to(self.down.weight.dtype)))
        return (self.up(self.act(self.down(h))) * self.scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"
