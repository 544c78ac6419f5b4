"""Shares of the token rows, each computed against all columns as a process of a sequence-parallel group computes
its own, add up to the whole problem: the loss and every row of both gradients, every engine and mode, shares that
end inside frames and tiles, and an empty one."""

import zlib

import pytest
import torch

from test_trd_loss import poison
from videorepa.kernels import trd_loss, triton_fused, triton_two_pass
from videorepa.kernels.fused import engine_for, loss_and_gradient
from videorepa.kernels.validation import validate

MARGIN = 0.1
TOKENS, FRAME = 45, 9  # 5 frames of 9 tokens; the Triton interpreter's tiles are 32 tokens
BACKENDS = {"two-pass": ("triton", "two-pass"), "fused": ("triton", "fused"), "torch": ("torch", "auto"),
            "naive": ("naive", "auto")}
MODES = {"full": None, "spatial": FRAME, "temporal": FRAME}


def make_case(layout, backend, mode, dtype=torch.float32, teacher_grad=True, grad=True, nan=False):
    name = f"{'-'.join(map(str, layout))}-{backend}-{mode}-{str(dtype)[6:]}" + ("" if teacher_grad else "-student") \
        + ("" if grad else "-nograd") + ("-nan" if nan else "")
    return dict(name=name, layout=layout, backend=backend, mode=mode, dtype=dtype, teacher_grad=teacher_grad,
                grad=grad, nan=nan)


def case_inputs(case):
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    student = torch.randn(2, TOKENS, 12, generator=gen)
    teacher = torch.randn(2, TOKENS, 7, generator=gen)
    if case["nan"]:
        student[1, 30, 2] = float("nan")  # in the last slice
    return student.to(case["dtype"]), teacher.to(case["dtype"])


def compute(case, student, teacher):
    """(loss, student gradient, teacher gradient) of `case` on these tokens."""
    backend, schedule = BACKENDS[case["backend"]]
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_(case["teacher_grad"])
    with torch.set_grad_enabled(case["grad"]):
        loss = trd_loss(s, t, MARGIN, case["mode"], MODES[case["mode"]], backend=backend, schedule=schedule)
    if case["grad"]:
        loss.backward()
    return loss.detach(), s.grad, t.grad


# The engines' row ranges (the kernels' rectangle of tiles), with the kernels' outputs poisoned.
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["two-pass", "fused", "torch"])
def test_row_shares_add_up_to_the_whole(monkeypatch, backend, mode):
    poison(monkeypatch, triton_two_pass, triton_fused)
    case = make_case((45,), backend, mode)
    student, teacher = case_inputs(case)
    loss, grad_s, grad_t = compute(case, student, teacher)
    total, parts = 0.0, []
    for start, end in ((0, 4), (4, 4), (4, 37), (37, 45)):
        problem = validate(student, teacher, MARGIN, mode, MODES[mode], rows=(start, end))
        engine = engine_for(problem, *BACKENDS[backend], True, True)
        # Without the other shares' sums the loss is this share's; the gradient's scale needs none of them.
        share_loss, share_s, share_t = loss_and_gradient(problem, engine, True, True, all_reduce=lambda sums: sums)
        total += share_loss.item()
        parts.append((share_s, share_t))
    assert total == pytest.approx(loss.item(), rel=1e-6)
    for index, whole in ((0, grad_s), (1, grad_t)):
        joined = torch.cat([part[index] for part in parts], dim=1)
        torch.testing.assert_close(joined, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
