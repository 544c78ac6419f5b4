"""The TRD loss as PyTorch operators (torch.library custom ops with fake and autograd registrations).

torch.compile keeps each operator as one node whose output shapes the fake implementations give: Dynamo never
traces into Triton's launcher or the blockwise engine's loops, `fullgraph=True` holds, and a new token count
re-uses the compiled graph instead of specialising the loss to it (the fakes take symbolic sizes; the launch
configuration rule may add a guard at its size thresholds).

- `videorepa::trd_loss_and_gradient_<version>`: loss and gradient in forward (blockwise PyTorch, the one-pass
  Triton kernel, and every backend under sequence parallelism, whose collectives stay inside); backward scales the
  gradient.
- `videorepa::trd_two_pass_<version>` / `videorepa::trd_two_pass_gradient_<version>`: Triton's pass 1 in forward,
  returning the pair map, partials and norms that backward's pass 2 reads.

Eager calls take the same implementations, forward and backward, through torch.autograd.Function instead
(`loss_and_gradient_op`, `two_pass_op`), skipping a custom operator's Python dispatch (autograd, backend and
aliasing layers, a Dynamo-disabled frame: ~50 µs per operator call on an H100 machine, where a paper-shape call's
kernels take 0.5 ms). Whenever something traces (torch.compile, export, make_fx, functorch transforms, a
TorchDispatchMode, meta tensors) the operators run instead, since the implementations launch Triton on real data.

The operators' names are private and versioned: they carry a hash of this package's code.
"""

import hashlib
import importlib.metadata
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .fused import differentiable_once, engine_for, loss_and_gradient
from .normalization import compute_dtype
from .validation import validate


def _code_hash() -> str:
    """A hash of this package's source files, names and contents (the installed version where the sources are not
    files, as in a zip)."""
    digest = hashlib.sha256()
    sources = sorted(Path(__file__).parent.glob("*.py"))
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    if not sources:
        digest.update(importlib.metadata.version("videorepa").encode())
    return digest.hexdigest()[:10]


# torch.compile's caches (FX graph, AOTAutograd) know a custom operator by its name alone: a backward graph cached
# under an earlier version of these operators would call them with that version's arguments, on a crash or, where
# the types still fit, silently. The names carry a hash of this package's code, so a changed package misses the
# cache.
_VERSION = _code_hash()


def _operator(name: str, implementation):
    return torch.library.custom_op(f"videorepa::{name}_{_VERSION}", implementation, mutates_args=())


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    """Operators return tensors only: an empty one stands for a gradient not computed."""
    return like.new_empty(0) if grad is None else grad


def _loss_and_gradient(student: Tensor, teacher: Tensor, margin: float, mode: str, tokens_per_frame: Optional[int],
                       backend: str, schedule: str, need_s: bool, need_t: bool,
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


trd_loss_and_gradient = _operator("trd_loss_and_gradient", _loss_and_gradient)


@trd_loss_and_gradient.register_fake
def _(student, teacher, margin, mode, tokens_per_frame, backend, schedule, need_s, need_t, group_name):
    return (student.new_empty((), dtype=torch.float32), student.new_empty(student.shape if need_s else 0),
            teacher.new_empty(teacher.shape if need_t else 0))


def _no_zero_gradients(ctx):
    """Autograd would hand backward zero-filled gradients for the outputs that get none (every output but the
    loss), allocating and writing tensors the size of the pair map or the inputs on every backward: at B = 1,
    N = 32,400 a 531 MB int8 map, half of the call's extra memory and 0.16 ms of an H100's time."""
    ctx.set_materialize_grads(False)


def _save_gradients(ctx, inputs, output):
    _no_zero_gradients(ctx)
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


def _two_pass(student: Tensor, teacher: Tensor, margin: float, mode: str, tokens_per_frame: Optional[int],
              need_s: bool, need_t: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, per-clip loss sums, pair map, radial partials, the student's and the teacher's norms); all but the
    first two empty without a gradient to compute, each input's norms without a gradient for it."""
    from .triton_two_pass import select_configs, two_pass_forward

    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    clip_sums, pair_map, radial, norms_s, norms_t = two_pass_forward(problem, need_s, need_t,
                                                                     select_configs(problem, need_s, need_t))
    if not (need_s or need_t):  # the kernel's stand-ins alias the loss partials
        pair_map, radial = student.new_empty(0, dtype=torch.int8), student.new_empty(0, dtype=torch.float32)
    norms_s, norms_t = (norms if need else norms.new_empty(0) for norms, need in ((norms_s, need_s), (norms_t, need_t)))
    return (clip_sums.sum() / problem.num_pairs).float(), clip_sums, pair_map, radial, norms_s, norms_t


trd_two_pass = _operator("trd_two_pass", _two_pass)


@trd_two_pass.register_fake
def _(student, teacher, margin, mode, tokens_per_frame, need_s, need_t):
    from .triton_two_pass import select_configs, tile_grid

    problem = validate(student, teacher, margin, mode, tokens_per_frame)
    block = select_configs(problem, need_s, need_t)[0]["BLOCK"]
    tiles, nwho = tile_grid(problem, block)[3], int(need_s) + int(need_t)
    batch, tokens = problem.batch, problem.tokens
    map_shape, radial_shape = ((batch, tiles, block, block), (batch, tiles, nwho, 2, block)) if nwho else (0, 0)
    norms_s, norms_t = (student.new_empty((2, batch, tokens) if need else 0, dtype=torch.float32)
                        for need in (need_s, need_t))
    return (student.new_empty((), dtype=torch.float32), student.new_empty(batch, dtype=torch.float64),
            student.new_empty(map_shape, dtype=torch.int8), student.new_empty(radial_shape, dtype=torch.float32),
            norms_s, norms_t)


def _two_pass_gradient(grad_output: Tensor, x: Tensor, norms: Tensor, clip_sums: Tensor, pair_map: Tensor,
                       radial: Tensor, margin: float, mode: str, tokens_per_frame: Optional[int], who: int, nwho: int,
                       teacher: bool, layout: list[int]) -> Tensor:
    """Pass 2: dL/dx for the student's or (`teacher`) the teacher's tokens x, as pass 1 laid out its map."""
    from .triton_two_pass import configs_of_layout, two_pass_gradient

    problem = validate(x, x, margin, mode, tokens_per_frame)  # pass 2 reads the token layout and x alone
    return two_pass_gradient(problem, x, norms, pair_map, radial, clip_sums, grad_output, teacher, who, nwho,
                             configs_of_layout(layout))


trd_two_pass_gradient = _operator("trd_two_pass_gradient", _two_pass_gradient)


@trd_two_pass_gradient.register_fake
def _(grad_output, x, norms, clip_sums, pair_map, radial, margin, mode, tokens_per_frame, who, nwho, teacher,
      layout):
    return x.new_empty(x.shape)


def _save_pass1(ctx, inputs, output):
    from .triton_two_pass import pass2_layout, select_configs

    _no_zero_gradients(ctx)
    student, teacher, margin, mode, tokens_per_frame, need_s, need_t = inputs
    if not (need_s or need_t):  # the loss alone: no backward
        return
    _, clip_sums, pair_map, radial, norms_s, norms_t = output
    # Pass 2 must read the map as pass 1 tiled it: the layout travels with the saved tensors.
    ctx.layout = pass2_layout(select_configs(validate(student, teacher, margin, mode, tokens_per_frame), need_s,
                                             need_t))
    ctx.arguments = (margin, mode, tokens_per_frame)
    ctx.need = (need_s, need_t)
    ctx.save_for_backward(student if need_s else None, teacher if need_t else None, norms_s, norms_t, clip_sums,
                          pair_map, radial)
    ctx.mark_non_differentiable(clip_sums, pair_map, radial, norms_s, norms_t)


@differentiable_once
def _pass2(ctx, grad_loss, *_):
    """Backward of pass 1: pass 2 for each input that needs a gradient."""
    student, teacher, norms_s, norms_t, clip_sums, pair_map, radial = ctx.saved_tensors
    need_s, need_t = ctx.need
    nwho = int(need_s) + int(need_t)
    gradient = trd_two_pass_gradient if _traced(grad_loss) else _two_pass_gradient
    grads = [gradient(grad_loss.reshape(1), x, norms, clip_sums, pair_map, radial, *ctx.arguments, who, nwho,
                      is_teacher, ctx.layout) if need else None
             for x, norms, need, who, is_teacher in ((student, norms_s, need_s, 0, False),
                                                     (teacher, norms_t, need_t, nwho - 1, True))]
    return (*grads, *[None] * 5)


trd_two_pass.register_autograd(_pass2, setup_context=_save_pass1)


def _traced(tensor: Tensor) -> bool:
    """Whether this call is being traced (torch.compile or export, compiled autograd, make_fx, functorch transforms,
    any TorchDispatchMode) or sees meta tensors: then only the operators, with their fake implementations, will do."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._are_functorch_transforms_active() or tensor.device.type == "meta")


def _function(name: str, implementation, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function running an operator's implementation, setup and backward. Its forward takes ctx itself:
    a Function with a separate setup_context binds every call's arguments to forward's signature first (~30 µs)."""

    def forward(ctx, *args):
        output = implementation(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), dict(forward=staticmethod(forward), backward=staticmethod(backward)))


def _eager_or_operator(function: type[torch.autograd.Function], operator):
    """`operator` when traced (see `_traced`), else the same implementation through `function`, without the
    operator's dispatch."""

    def call(student, *args):
        return operator(student, *args) if _traced(student) else function.apply(student, *args)

    return call


loss_and_gradient_op = _eager_or_operator(
    _function("TRDLossAndGradient", _loss_and_gradient, _save_gradients, _scale_gradients), trd_loss_and_gradient)
two_pass_op = _eager_or_operator(_function("TRDTwoPass", _two_pass, _save_pass1, _pass2), trd_two_pass)
