"""torch.compile(fullgraph=True) over a step that calls the TRD loss: one graph with no break on every backend and
schedule, the eager loss and gradients, and token counts that change without recompiling the step."""

import pytest
import torch
from torch import nn

from devices import DEVICE
from videorepa import TRDLoss

BACKENDS = [
    pytest.param(("triton", "two-pass"), id="two-pass"),
    pytest.param(("triton", "fused"), id="fused"),
    pytest.param(("torch", "auto"), id="torch"),
    pytest.param(("naive", "auto"), id="naive"),
]
FRAME = 8


def step(projector, criterion, x, teacher):
    return 0.5 * criterion(projector(x), teacher)


def gradients(fn, projector, criterion, x, teacher):
    projector.zero_grad()
    teacher = teacher.clone().requires_grad_()
    loss = fn(projector, criterion, x, teacher)
    loss.backward()
    return [loss.detach(), teacher.grad] + [p.grad.clone() for p in projector.parameters()]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager_for_any_token_count(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    projector = nn.Linear(10, 16).to(DEVICE)
    criterion = TRDLoss(margin=0.1, mode="temporal", tokens_per_frame=FRAME, backend=backend[0],
                        schedule=backend[1])
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for frames in (5, 7):  # N = 40, then 56: symbolic sizes, and the second N must not recompile
        x = torch.randn(2, frames * FRAME, 10, generator=gen).to(DEVICE)
        teacher = torch.randn(2, frames * FRAME, 12, generator=gen).to(DEVICE)
        expected = gradients(step, projector, criterion, x, teacher)
        with torch._dynamo.config.patch(error_on_recompile=frames > 5):
            got = gradients(compiled, projector, criterion, x, teacher)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_traced_calls_use_the_operators(backend):
    # Eager calls skip the operators' dispatch, but whatever traces the loss must meet the operators (with their
    # fake implementations), never Triton's launcher: compiled autograd over an eager forward, and make_fx.
    from torch.fx.experimental.proxy_tensor import make_fx

    gen = torch.Generator().manual_seed(5)
    student = torch.randn(2, 5 * FRAME, 10, generator=gen).to(DEVICE).requires_grad_()
    teacher = torch.randn(2, 5 * FRAME, 12, generator=gen).to(DEVICE)
    criterion = TRDLoss(margin=0.1, mode="temporal", tokens_per_frame=FRAME, backend=backend[0], schedule=backend[1])
    (expected,) = torch.autograd.grad(criterion(student, teacher), student)
    loss = criterion(student, teacher)
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="eager", fullgraph=True)):
        loss.backward()
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
    graph = make_fx(lambda s, t: criterion(s, t), tracing_mode="fake")(student.detach(), teacher)
    assert [node for node in graph.graph.nodes if str(node.target).startswith("videorepa.")]


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_operators_pass_opcheck(backend):
    # The fake implementations must give the real outputs' shapes, dtypes and strides, or a compiled graph fails
    # its stride checks (or silently misreads the outputs): B·N = 37, a count no tile or alignment divides.
    from videorepa.kernels import ops

    gen = torch.Generator().manual_seed(6)
    student = torch.randn(1, 37, 10, generator=gen).to(DEVICE).requires_grad_()
    teacher = torch.randn(1, 37, 12, generator=gen).to(DEVICE).requires_grad_()
    if backend[1] == "two-pass":
        torch.library.opcheck(ops.trd_two_pass, (student, teacher, 0.1, "full", None, True, True))
    else:
        torch.library.opcheck(ops.trd_loss_and_gradient,
                              (student, teacher, 0.1, "full", None, backend[0], backend[1], True, True, ""))
