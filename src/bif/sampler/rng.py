"""Per-chain random generators: every chain reproducible from (seed, chain index) alone."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

Params = dict[str, Tensor]


def chain_seed(seed: int, chain: int) -> int:
    """Independent 63-bit seed of chain ``chain`` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed, chain]).generate_state(1, np.uint64)[0] >> 1)


class ChainRandom:
    """Per-chain generators: noise on the sampling device, minibatch indices on the CPU."""

    def __init__(self, seed: int, chains: list[int], device: torch.device) -> None:
        self.noise = [torch.Generator(device).manual_seed(chain_seed(seed, c)) for c in chains]
        self.index = [torch.Generator().manual_seed(chain_seed(seed, c) ^ 0x5EED) for c in chains]

    def normal_like(self, params: Params) -> Params:
        """ξ ~ N(0, I) for chain-stacked ``params`` [G, ...], row g from chain g's generator.

        One draw of all P numbers per chain (then split into the parameters' shapes as views):
        per-step cost independent of how many tensors the model has."""
        ref = next(iter(params.values()))
        if any(v.dtype != ref.dtype or v.device != ref.device for v in params.values()):
            return {
                k: torch.stack(
                    [
                        torch.randn(v.shape[1:], generator=g, device=v.device, dtype=v.dtype)
                        for g in self.noise
                    ]
                )
                for k, v in params.items()
            }
        sizes = [v[0].numel() for v in params.values()]
        total = sum(sizes)
        flat = torch.empty(len(self.noise), total, device=ref.device, dtype=ref.dtype)  # [G, P]
        for row, g in zip(flat, self.noise, strict=True):
            torch.randn(total, generator=g, device=ref.device, dtype=ref.dtype, out=row)
        out, i = {}, 0
        for (k, v), n in zip(params.items(), sizes, strict=True):
            out[k] = flat[:, i : i + n].view(v.shape)
            i += n
        return out

    def indices(self, n: int, batch_size: int) -> Tensor:
        """Minibatch indices (with replacement) for each chain, concatenated: [G·B]."""
        return torch.cat([torch.randint(n, (batch_size,), generator=g) for g in self.index])

    def states(self) -> dict[str, Tensor]:
        out = {}
        for i, (gn, gi) in enumerate(zip(self.noise, self.index, strict=True)):
            out[f"rng.noise.{i}"] = gn.get_state()
            out[f"rng.index.{i}"] = gi.get_state()
        return out

    def restore(self, tensors: dict[str, Tensor]) -> None:
        for i, (gn, gi) in enumerate(zip(self.noise, self.index, strict=True)):
            gn.set_state(tensors[f"rng.noise.{i}"])
            gi.set_state(tensors[f"rng.index.{i}"])
