"""SyncBatchNorm on batchops kernels: batch statistics over every rank of a process group.

Drop-in for torch.nn.SyncBatchNorm (same constructor, parameters, buffers and state_dict
keys), plus the fused activation / residual of batchops.BatchNorm2d, and it also runs on the
CPU (gloo), where torch's refuses the input.

Per training step it makes exactly one collective in forward and at most one in backward:

* forward: each rank computes its per-channel (count, mean, m2) with the batchops statistics
  kernel (torch.ops.batchops.batch_norm_stats); one all_gather of [count, mean, m2] (float64,
  2C+1 values per rank); every rank merges the gathered rows with Chan's formula in the same
  order (so all ranks get bitwise the same result, and no precision is lost to torch's
  mean/invstd round trip); the batch is then normalised with the eval-mode batchops forward
  kernel (act((x - mean) * invstd * w + b + residual) in one pass). Empty ranks contribute
  count 0. No host synchronisation (CUDA-graph friendly).
* backward: local sum(g) and sum(g * xhat) (g = dy * act'(pre)) from the eval-mode backward
  kernel; one all_reduce of those 2C values when the input needs a gradient (as torch's); then
  grad_input = w * invstd * (g - mean(g) - xhat * mean(g * xhat)) in one pass
  (torch.ops.batchops.batch_norm_backward_elemt). grad_weight / grad_bias are the local sums,
  as torch's SyncBatchNorm returns them: DistributedDataParallel reduces parameter gradients.

Like torch's, every rank of the group must call forward (and backward) the same number of
times, with inputs whose requires_grad is the same on every rank (an empty batch is fine),
otherwise the collectives do not match and the ranks wait for each other forever.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm

from batchops.nn.batch_norm import BatchNormBase, replace_norm
from batchops.ops.batch_norm import batch_norm_backward, batch_norm_backward_elemt, batch_norm_forward, batch_norm_stats

__all__ = ["SyncBatchNorm"]


def _all_gather_rows(local: Tensor, process_group, world_size: int) -> Tensor:
    """(world_size, local.numel()): every rank's `local`, in rank order."""
    if dist.get_backend(process_group) == "gloo":  # gloo has no all_gather_into_tensor
        rows = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(rows, local, group=process_group)
        return torch.stack(rows)
    out = local.new_empty((world_size, local.numel()))
    dist.all_gather_into_tensor(out, local, group=process_group)
    return out


def _merge(gathered: Tensor, C: int) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's merge of per-rank rows [count, mean(C), m2(C)] -> (count (1,), mean, m2)."""
    counts = gathered[:, :1]
    means = gathered[:, 1 : C + 1]
    m2s = gathered[:, C + 1 :]
    total = counts.sum(0)
    n = total.clamp(min=1)  # an all-empty batch: mean 0, m2 0
    mean = (counts * means).sum(0) / n
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        # batch_norm_forward's arguments in its order (as functional.batch_norm passes them), less
        # training (always) and momentum_tensor (momentum is either), then the process group.
        input,
        weight,
        bias,
        residual,
        running_mean,
        running_var,
        momentum,
        eps,
        activation,
        process_group,
        world_size,
    ):
        C = input.size(1)
        count = input.numel() // C
        local_mean, local_m2 = batch_norm_stats(input)
        stat = local_mean.dtype
        local = torch.cat(
            [
                local_m2.new_full((1,), float(count), dtype=torch.float64),
                local_mean.to(torch.float64),
                local_m2.to(torch.float64),
            ]
        )
        total, mean, m2 = _merge(_all_gather_rows(local, process_group, world_size), C)
        var = m2 / total.clamp(min=1)

        if running_mean is not None:
            # Unbiased variance, momentum as a float or a tensor (cumulative average); a batch
            # that is empty on every rank leaves the estimates alone (no host sync to decide).
            unbiased = torch.where(total > 1, m2 / (total - 1).clamp(min=1), var)
            m = momentum.to(torch.float64) if isinstance(momentum, Tensor) else momentum
            old_mean, old_var = running_mean.to(torch.float64), running_var.to(torch.float64)
            running_mean.copy_(torch.where(total > 0, old_mean * (1 - m) + mean * m, old_mean))
            running_var.copy_(torch.where(total > 0, old_var * (1 - m) + unbiased * m, old_var))

        output, save_mean, save_invstd, _, _ = batch_norm_forward(
            input, weight, bias, residual, mean.to(stat), var.to(stat), False, 0.0, None, eps, activation
        )
        ctx.save_for_backward(input, weight, bias, residual, save_mean, save_invstd, total)
        ctx.activation = activation
        ctx.process_group = process_group
        return output

    @staticmethod
    def backward(ctx, grad_output):
        *saved, total = ctx.saved_tensors
        # Both backward kernels take the forward's saved state in this order, after grad_output.
        input, weight, bias, residual, save_mean, save_invstd = saved
        need_input, need_weight, need_bias, need_residual = ctx.needs_input_grad[:4]
        need_weight = need_weight and weight is not None
        need_bias = need_bias and bias is not None
        need_residual = need_residual and residual is not None
        C = input.size(1)
        grad_input = grad_weight = grad_bias = grad_residual = None
        mean_g = mean_gxhat = save_mean  # placeholders when only grad_residual is needed
        if need_input or need_weight or need_bias:
            # Eval mode: grad_weight = sum(g * xhat), grad_bias = sum(g), local to this rank
            # (zeros for an empty batch, which still joins the all_reduce below).
            _, sum_gxhat, sum_g, _ = batch_norm_backward(
                grad_output, *saved, False, ctx.activation, [False, True, True, False]
            )
            if need_weight:
                grad_weight = sum_gxhat
            if need_bias:
                grad_bias = sum_g
            if need_input:
                sums = torch.cat([sum_g.to(torch.float64), sum_gxhat.to(torch.float64)])
                dist.all_reduce(sums, dist.ReduceOp.SUM, group=ctx.process_group)
                sums = sums / total.clamp(min=1)
                mean_g, mean_gxhat = sums[:C].to(save_mean.dtype), sums[C:].to(save_mean.dtype)
        if need_input or need_residual:
            gi, gz = batch_norm_backward_elemt(
                grad_output, *saved, mean_g, mean_gxhat, ctx.activation, [need_input, need_residual]
            )
            grad_input = gi if need_input else None
            grad_residual = gz if need_residual else None
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None, None


class SyncBatchNorm(BatchNormBase):
    """torch.nn.SyncBatchNorm on batchops kernels, for any input of 2 to 5 dimensions (N, C, *).

    forward(input, residual=None) returns activation(bn(input) + residual), the statistics taken
    over the batches of every rank of `process_group` (default: the whole world) in training.
    Without an initialised process group, with a group of one rank, or in eval mode it is plain
    batchops batch norm (batchops.functional.batch_norm). CPU tensors work with gloo, CUDA
    tensors with nccl (or gloo). Ranks may have different batch sizes, including empty ones.
    """

    def __init__(
        self,
        # torch.nn.SyncBatchNorm's arguments (batch norm's, plus process_group), then batchops' own.
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, activation=activation
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_group(self):
        """(process_group, world_size) when this forward synchronises, else None."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        sync = self._sync_group()
        if sync is None:
            return super().forward(input, residual)
        process_group, world_size = sync
        momentum = self._training_momentum()  # the sync path only runs in training
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            residual,
            running_mean,
            running_var,
            momentum,
            self.eps,
            self.activation,
            process_group,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any | None = None) -> nn.Module:
        """Replace every BatchNorm*d in `module` (or `module` itself) with a SyncBatchNorm:
        torch's (torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm, ...) and batchops' (their
        activation is kept). Parameters and buffers are shared, not copied, as torch's
        convert_sync_batchnorm does, so optimizer state carries over; train/eval mode and
        qconfig too. Returns the converted module: use the return value."""
        out = module
        if isinstance(module, (_TorchBatchNorm, BatchNormBase)):
            out = replace_norm(module, cls, process_group, activation=getattr(module, "activation", None))
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
