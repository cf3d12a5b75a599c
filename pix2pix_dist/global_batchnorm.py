"""BatchNorm over the global batch: each layer's statistics cover every process's images, so a
recipe's BatchNorm sees the images the recipe says on any number of processes
(`model.norm=batch`; docs/design.md, "BatchNorm over the recipe's batch").

On CUDA this is torch's SyncBatchNorm (fused kernels). SyncBatchNorm refuses CPU tensors, so on
any other device (CPU runs, and CI's gloo tests) `GlobalBatchNorm2d` below does the same math:
one all-reduce of each channel's sum, sum of squares and count per forward, through torch's
functional all_reduce (`torch.distributed._functional_collectives`, what torch names as the
successor of the deprecated `torch.distributed.nn.functional.all_reduce`), whose backward
all-reduces the gradient, so the gradient is the full batch's too. The sums are float64: E[x^2] - E[x]^2 then loses nothing
that matters in float32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training-mode statistics are over all processes of the default
    process group (which must exist). Eval mode uses the running statistics, like BatchNorm.
    Same parameters, buffers and state_dict as nn.BatchNorm2d, so checkpoints and exports load
    into the plain network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, 2, 3]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> float32; float64 kept
        count = x.new_full((1,), x.numel() // channels, dtype=torch.float64)
        local = torch.cat([xf.sum(dims, dtype=torch.float64),
                           xf.square().sum(dims, dtype=torch.float64), count])
        # Summed over processes; differentiable: its backward all-reduces the gradient.
        sums = funcol.all_reduce(local, "sum", dist.group.WORLD)
        total = sums[-1]
        mean = sums[:channels] / total
        var = (sums[channels:2 * channels] / total - mean.square()).clamp_min(0)  # biased
        if self.track_running_stats:
            # As nn.BatchNorm2d: momentum (or a cumulative average when it is None) and the
            # unbiased variance of the whole batch (total >= 2: one image on each of >= 2 processes).
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var * (total / (total - 1))).to(self.running_var.dtype), factor)
        invstd = torch.rsqrt(var + self.eps)
        scale, shift = invstd, -mean * invstd
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = (1, channels, 1, 1)
        y = xf * scale.to(xf.dtype).view(shape) + shift.to(xf.dtype).view(shape)
        return y.to(x.dtype)


def convert_to_global_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with every BatchNorm2d computing its statistics over all processes: torch's
    SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere. Call once a process group exists and
    the world size is above 1; returns the converted module (the root may be replaced)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if type(module) is nn.BatchNorm2d:
        converted = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum,
                                      module.affine, module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_to_global_batchnorm(child, device))
    return module
