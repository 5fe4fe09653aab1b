"""torch.ops.batchops.{linear,grouped_linear}_{forward,backward}: fake kernels and autograd.

Each forward returns (output, saved): `saved` is the activation's derivative
act'(input @ weight^T + bias) for silu / gelu / gelu_tanh, computed with the activation so
that backward is a multiply, and an empty tensor otherwise (relu's backward reads the
output) or when save_for_backward is False (no autograd: batchops.functional decides). See
csrc/linear/linear.h.
"""
from __future__ import annotations

import torch

from batchops._extension import extension_available, require_extension

_SAVES_DERIVATIVE = ("silu", "gelu", "gelu_tanh")

_DOUBLE_BACKWARD_ERROR = (
    "batchops.linear / batchops.grouped_linear: double backward (a gradient of the gradient) is not supported. "
    "Use torch.nn.functional.linear (per group) and the activation separately where second derivatives are needed."
)


def linear_forward(input, weight, bias, activation, save_for_backward=True):
    """-> (output, saved)."""
    require_extension()
    return torch.ops.batchops.linear_forward(input, weight, bias, activation, save_for_backward)


def grouped_linear_forward(input, weight, bias, group_sizes, activation, save_for_backward=True):
    """-> (output, saved)."""
    require_extension()
    return torch.ops.batchops.grouped_linear_forward(input, weight, bias, group_sizes, activation, save_for_backward)


def _out_shape(input, out_features):
    return (*input.shape[:-1], out_features)


def _forward_outputs(input, out_features, activation, save_for_backward):
    shape = _out_shape(input, out_features)
    output = input.new_empty(shape)
    saves = save_for_backward and activation in _SAVES_DERIVATIVE
    saved = input.new_empty(shape) if saves else input.new_empty((0,))
    return output, saved


def _linear_forward_fake(input, weight, bias, activation, save_for_backward=True):
    return _forward_outputs(input, weight.shape[0], activation, save_for_backward)


def _grouped_forward_fake(input, weight, bias, group_sizes, activation, save_for_backward=True):
    return _forward_outputs(input, weight.shape[1], activation, save_for_backward)


def _backward_outputs(input, weight, bias, output_mask):
    def empty():
        return input.new_empty((0,))

    return (
        input.new_empty(input.shape) if output_mask[0] else empty(),
        weight.new_empty(weight.shape) if output_mask[1] else empty(),
        bias.new_empty(bias.shape) if output_mask[2] and bias is not None else empty(),
    )


def _linear_backward_fake(grad_output, input, weight, bias, output, saved, activation, output_mask):
    return _backward_outputs(input, weight, bias, output_mask)


def _grouped_backward_fake(grad_output, input, weight, bias, group_sizes, output, saved, activation, output_mask):
    return _backward_outputs(input, weight, bias, output_mask)


def _check_saved(ctx):
    if not ctx.saved_for_backward and ctx.activation in _SAVES_DERIVATIVE:
        raise RuntimeError(f"batchops linear backward: the forward op ran with save_for_backward=False, so it saved "
                           f"nothing for the backward of activation '{ctx.activation}'; call it with "
                           f"save_for_backward=True (batchops.functional does when a gradient is needed)")


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias, activation, save_for_backward = inputs
    out, saved = output
    ctx.saved_for_backward = save_for_backward
    # `saved` gets no gradient; without this autograd would hand backward a zero-filled tensor
    # of its full size for it, one more pass over (rows, out_features) per backward.
    ctx.set_materialize_grads(False)
    # relu's backward reads the output; the others never do.
    ctx.save_for_backward(input, weight, bias, out if activation == "relu" else None, saved)
    ctx.activation = activation


def _linear_backward(ctx, grad_output, _grad_saved):
    input, weight, bias, out, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and bias is not None]
    if not any(mask) or grad_output is None:
        return None, None, None, None, None
    _check_saved(ctx)
    out = out if out is not None else input.new_empty((0,))
    gi, gw, gb = torch.ops.batchops.linear_backward(grad_output, input, weight, bias, out, saved, ctx.activation,
                                                   mask)
    return gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None


def _grouped_setup_context(ctx, inputs, output):
    input, weight, bias, group_sizes, activation, save_for_backward = inputs
    out, saved = output
    ctx.saved_for_backward = save_for_backward
    ctx.set_materialize_grads(False)  # as in _linear_setup_context
    ctx.save_for_backward(input, weight, bias, group_sizes, out if activation == "relu" else None, saved)
    ctx.activation = activation


def _grouped_backward(ctx, grad_output, _grad_saved):
    input, weight, bias, group_sizes, out, saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [need[0], need[1], need[2] and bias is not None]
    if not any(mask) or grad_output is None:
        return None, None, None, None, None, None
    _check_saved(ctx)
    out = out if out is not None else input.new_empty((0,))
    gi, gw, gb = torch.ops.batchops.grouped_linear_backward(grad_output, input, weight, bias, group_sizes, out, saved,
                                                           ctx.activation, mask)
    return gi if mask[0] else None, gw if mask[1] else None, gb if mask[2] else None, None, None, None


def _no_setup(ctx, inputs, output):
    pass


def _double_backward(ctx, *grads):
    # Without this registration autograd would only warn and hand back None gradients.
    raise RuntimeError(_DOUBLE_BACKWARD_ERROR)


if extension_available():
    torch.library.register_fake("batchops::linear_forward")(_linear_forward_fake)
    torch.library.register_fake("batchops::linear_backward")(_linear_backward_fake)
    torch.library.register_fake("batchops::grouped_linear_forward")(_grouped_forward_fake)
    torch.library.register_fake("batchops::grouped_linear_backward")(_grouped_backward_fake)
    torch.library.register_autograd("batchops::linear_forward", _linear_backward, setup_context=_linear_setup_context)
    torch.library.register_autograd("batchops::grouped_linear_forward", _grouped_backward,
                                    setup_context=_grouped_setup_context)
    for _name in ("batchops::linear_backward", "batchops::grouped_linear_backward"):
        torch.library.register_autograd(_name, _double_backward, setup_context=_no_setup)
