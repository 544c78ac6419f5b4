"""The TRD loss as PyTorch operators (torch.library custom ops with fake and autograd registrations).

torch.compile keeps each operator as one node whose output shapes the fake implementations give: Dynamo never
traces into Triton's launcher or the blockwise engine's loops, `fullgraph=True` holds, and a new token count
re-uses the compiled graph instead of specialising the loss to it (the fakes take symbolic sizes; the launch
configuration rule may add a guard at its size thresholds). Eager calls run the same operators.

- `videorepa::trd_loss_and_gradient`: loss and gradient in forward (blockwise PyTorch, the one-pass Triton kernel,
  and every backend under sequence parallelism, whose collectives stay inside); backward scales the gradient.
- `videorepa::trd_two_pass` / `videorepa::trd_two_pass_gradient`: Triton's pass 1 in forward, returning the pair
  map and partials that backward's pass 2 reads.
"""

from typing import Optional

import torch
from torch import Tensor

from .fused import differentiable_once, engine_for, gradient_scale, loss_and_gradient
from .normalization import compute_dtype
from .validation import validate


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """Operators return tensors only: an empty one stands for a gradient not computed."""
    return like.new_empty(0) if grad is None else grad


@torch.library.custom_op("videorepa::trd_loss_and_gradient", mutates_args=())
def trd_loss_and_gradient(student: Tensor, teacher: Tensor, margin: float, mode: str,
                          tokens_per_frame: Optional[int], backend: str, schedule: str, need_s: bool, need_t: bool,
                          group_name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dL/dstudent or empty, dL/dteacher or empty). With `group_name` the inputs are this process's slices
    of the token axis, the loss is the whole clips' and the gradients are those of the slices."""
    if group_name:
        from .sequence_parallel import sharded_loss_and_gradient

        loss, grad_s, grad_t = sharded_loss_and_gradient(student, teacher, margin, mode, tokens_per_frame, backend,
                                                         schedule, need_s, need_t, group_name)
    else:
        problem = validate(student, teacher, margin, mode, tokens_per_frame)
        loss, grad_s, grad_t = loss_and_gradient(problem, engine_for(problem, backend, schedule, need_s, need_t),
                                                 need_s, need_t)
    return loss, _or_empty(grad_s, student), _or_empty(grad_t, teacher)


@trd_loss_and_gradient.register_fake
def _(student, teacher, margin, mode, tokens_per_frame, backend, schedule, need_s, need_t, group_name):
    return (student.new_empty((), dtype=torch.float32), student.new_empty(student.shape if need_s else 0),
            teacher.new_empty(teacher.shape if need_t else 0))


def _save_gradients(ctx, inputs, output):
    _, grad_s, grad_t = output
    ctx.need = inputs[7:9]
    ctx.save_for_backward(grad_s, grad_t)
    ctx.mark_non_differentiable(grad_s, grad_t)


@differentiable_once
def _scale_gradients(ctx, grad_loss, *_):
    scaled = [_times(g, grad_loss) if need else None for g, need in zip(ctx.saved_tensors, ctx.need)]
    return (*scaled, *[None] * 8)


def _times(g: Tensor, grad_loss: Tensor) -> Tensor:
    """g · grad_loss in g's dtype, multiplied in float32 (float64 for float64 g). `g * grad_loss` would round a
    0-dim CUDA grad_loss to g's bf16 first (0.3 -> 0.30078125, a 0.26 % bias, seen on an H100); as a 1-element
    tensor of g's rank it takes part in type promotion, and `out=` writes g's dtype without a float32 copy of g
    (CUDA casts inside the kernel)."""
    scale = grad_loss.reshape((1,) * g.dim()).to(compute_dtype(g))
    return torch.mul(g, scale, out=torch.empty_like(g))


trd_loss_and_gradient.register_autograd(_scale_gradients, setup_context=_save_gradients)


@torch.library.custom_op("videorepa::trd_two_pass", mutates_args=())
def trd_two_pass(student: Tensor, teacher: Tensor, margin: float, mode: str, tokens_per_frame: Optional[int],
                 need_s: bool, need_t: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-clip loss sums, pair map, radial partials); the last two empty without a gradient to compute."""
    from .triton_two_pass import select_configs, two_pass_forward

    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    clip_sums, pair_map, radial = two_pass_forward(problem, need_s, need_t, select_configs(problem, need_s, need_t))
    if not (need_s or need_t):  # the kernel's stand-ins alias the loss partials
        pair_map, radial = student.new_empty(0, dtype=torch.int8), student.new_empty(0, dtype=torch.float32)
    return (clip_sums.sum() / problem.num_pairs).float(), clip_sums, pair_map, radial


@trd_two_pass.register_fake
def _(student, teacher, margin, mode, tokens_per_frame, need_s, need_t):
    from .triton_two_pass import select_configs, tile_grid

    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    block = select_configs(problem, need_s, need_t)[0]["BLOCK"]
    tiles, nwho = tile_grid(problem, block)[3], int(need_s) + int(need_t)
    batch = problem.batch
    map_shape, radial_shape = ((batch, tiles, block, block), (batch, tiles, nwho, 2, block)) if nwho else (0, 0)
    return (student.new_empty((), dtype=torch.float32), student.new_empty(batch, dtype=torch.float64),
            student.new_empty(map_shape, dtype=torch.int8), student.new_empty(radial_shape, dtype=torch.float32))


@torch.library.custom_op("videorepa::trd_two_pass_gradient", mutates_args=())
def trd_two_pass_gradient(grad_output: Tensor, x: Tensor, clip_sums: Tensor, pair_map: Tensor, radial: Tensor,
                          margin: float, mode: str, tokens_per_frame: Optional[int], who: int, nwho: int,
                          teacher: bool, layout: list[int]) -> Tensor:
    """Pass 2: dL/dx for the student's or (`teacher`) the teacher's tokens x, as pass 1 laid out its map."""
    from .triton_two_pass import configs_of_layout, two_pass_gradient

    problem = validate(x, x, margin, mode, tokens_per_frame)  # pass 2 reads the token layout and x alone
    coef = (gradient_scale(clip_sums, problem.num_pairs) * grad_output.double()).float()
    return two_pass_gradient(problem, x, pair_map, radial, -coef if teacher else coef, who, nwho,
                             configs_of_layout(layout))


@trd_two_pass_gradient.register_fake
def _(grad_output, x, clip_sums, pair_map, radial, margin, mode, tokens_per_frame, who, nwho, teacher, layout):
    return x.new_empty(x.shape)


def _save_pass1(ctx, inputs, output):
    from .triton_two_pass import pass2_layout, select_configs

    student, teacher, margin, mode, tokens_per_frame, need_s, need_t = inputs
    _, clip_sums, pair_map, radial = output
    # Pass 2 must read the map as pass 1 tiled it: the layout travels with the saved tensors.
    ctx.layout = pass2_layout(select_configs(validate(student, teacher, margin, mode, tokens_per_frame), need_s,
                                             need_t))
    ctx.arguments = (margin, mode, tokens_per_frame)
    ctx.need = (need_s, need_t)
    ctx.save_for_backward(student if need_s else None, teacher if need_t else None, clip_sums, pair_map, radial)
    ctx.mark_non_differentiable(clip_sums, pair_map, radial)


@differentiable_once
def _pass2(ctx, grad_loss, *_):
    student, teacher, clip_sums, pair_map, radial = ctx.saved_tensors
    need_s, need_t = ctx.need
    nwho = int(need_s) + int(need_t)
    grads = [trd_two_pass_gradient(grad_loss, x, clip_sums, pair_map, radial, *ctx.arguments, who, nwho, is_teacher,
                                   ctx.layout) if need else None
             for x, need, who, is_teacher in ((student, need_s, 0, False), (teacher, need_t, nwho - 1, True))]
    return (*grads, *[None] * 5)


trd_two_pass.register_autograd(_pass2, setup_context=_save_pass1)
