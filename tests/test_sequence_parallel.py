"""trd_loss(..., group=...) with the token axis split across 2 and 3 gloo processes, against the single-process
result: the loss on every rank and every row of the gradients, every backend, schedule and mode, uneven slices
(an empty one too) and frames that straddle slice edges. Bad or disagreeing slices raise on every rank."""

import functools
import re
import zlib

import pytest
import torch
import torch.distributed as dist

from multiprocess import run_processes
from test_trd_loss import poison
from videorepa.kernels import trd_loss, triton_fused, triton_two_pass
from videorepa.kernels.fused import engine_for, loss_and_gradient
from videorepa.kernels.validation import validate

MARGIN = 0.1
TOKENS, FRAME = 45, 9  # 5 frames of 9 tokens; the Triton interpreter's tiles are 32 tokens
BACKENDS = {"two-pass": ("triton", "two-pass"), "fused": ("triton", "fused"), "torch": ("torch", "auto"),
            "naive": ("naive", "auto")}
MODES = {"full": None, "spatial": FRAME, "temporal": FRAME}
# Slice sizes in rank order: slices that end inside frames and inside tiles, and an empty one.
LAYOUTS = {2: [(20, 25)], 3: [(5, 31, 9), (17, 0, 28)]}


def make_case(layout, backend, mode, dtype=torch.float32, teacher_grad=True, grad=True, nan=False):
    name = f"{'-'.join(map(str, layout))}-{backend}-{mode}-{str(dtype)[6:]}" + ("" if teacher_grad else "-student") \
        + ("" if grad else "-nograd") + ("-nan" if nan else "")
    return dict(name=name, layout=layout, backend=backend, mode=mode, dtype=dtype, teacher_grad=teacher_grad,
                grad=grad, nan=nan)


CASES = [make_case(layout, backend, mode) for layouts in LAYOUTS.values() for layout in layouts[:1]
         for backend in BACKENDS for mode in MODES]
CASES += [make_case((17, 0, 28), backend, "temporal") for backend in BACKENDS]
CASES += [make_case((20, 25), backend, "full", torch.bfloat16) for backend in ("two-pass", "fused", "torch")]
CASES += [make_case((20, 25), "two-pass", "spatial", teacher_grad=False),
          make_case((5, 31, 9), "fused", "temporal", teacher_grad=False),
          make_case((5, 31, 9), "two-pass", "temporal", grad=False),
          make_case((20, 25), "torch", "temporal", nan=True), make_case((20, 25), "two-pass", "full", nan=True)]


def case_inputs(case):
    gen = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()))
    student = torch.randn(2, TOKENS, 12, generator=gen)
    teacher = torch.randn(2, TOKENS, 7, generator=gen)
    if case["nan"]:
        student[1, 30, 2] = float("nan")  # in the last slice
    return student.to(case["dtype"]), teacher.to(case["dtype"])


def compute(case, student, teacher, group=None):
    """(loss, student gradient, teacher gradient) of `case` on these tokens."""
    backend, schedule = BACKENDS[case["backend"]]
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_(case["teacher_grad"])
    with torch.set_grad_enabled(case["grad"]):
        loss = trd_loss(s, t, MARGIN, case["mode"], MODES[case["mode"]], backend=backend, schedule=schedule,
                        group=group)
    if case["grad"]:
        loss.backward()
    return loss.detach(), s.grad, t.grad


def slice_bounds(layout, rank):
    start = sum(layout[:rank])
    return start, start + layout[rank]


def sharded_worker(rank, world, cases):
    results = {}
    for case in cases:
        start, end = slice_bounds(case["layout"], rank)
        student, teacher = case_inputs(case)
        results[case["name"]] = compute(case, student[:, start:end], teacher[:, start:end], dist.group.WORLD)
    if world == 2:
        results["errors"] = error_scenarios(rank)
        results["double backward"] = double_backward_messages(rank)
        results["compiled"] = compiled_losses(rank)
    return results


@functools.lru_cache(maxsize=None)
def sharded_results(world):
    cases = [case for case in CASES if len(case["layout"]) == world]
    return run_processes(world, sharded_worker, cases)


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_sharded_matches_single_process(case):
    ranks = sharded_results(len(case["layout"]))
    student, teacher = case_inputs(case)
    loss, grad_s, grad_t = compute(case, student, teacher)
    losses = [rank[case["name"]][0] for rank in ranks]
    for other in losses:  # the same loss on every rank
        torch.testing.assert_close(other, losses[0], rtol=0, atol=0, equal_nan=True)
    if case["nan"]:
        assert torch.isnan(losses[0])
    else:
        torch.testing.assert_close(losses[0], loss, rtol=1e-6, atol=0)
    if not case["grad"]:
        assert all(rank[case["name"]][1] is None for rank in ranks)
        return
    rtol = 1e-5 if case["dtype"] == torch.float32 else 2e-2
    for index, whole in ((1, grad_s), (2, grad_t)):
        parts = [rank[case["name"]][index] for rank in ranks]
        if whole is None:
            assert all(part is None for part in parts)
            continue
        for rank, part in enumerate(parts):
            assert part.shape == (2, case["layout"][rank], whole.shape[2]) and part.dtype == whole.dtype
        joined = torch.cat(parts, dim=1).double()
        if case["nan"]:
            # The clip holding the NaN has an all-NaN gradient on every rank, the other clip an exact one.
            assert torch.isnan(joined[1]).all() == torch.isnan(whole[1]).all()
            joined, whole = joined[:1], whole[:1]
        torch.testing.assert_close(joined, whole.double(), rtol=rtol, atol=rtol * whole.abs().max().item())


# The in-process counterpart: shares of the rows, computed one at a time, add up to the whole problem. It checks
# the engines' row ranges (the kernels' rectangle of tiles) without processes, with the kernels' outputs poisoned.
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


def _message(fn) -> str:
    try:
        fn()
    except (TypeError, ValueError) as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def error_scenarios(rank):
    """What each rank raises when the slices disagree or one rank's input is bad; afterwards the group still works."""
    gen = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(2, 10 + rank, 12, generator=gen), torch.randn(2, 10 + rank, 7, generator=gen)
    world = dist.group.WORLD

    def call(s=student, t=teacher, **kwargs):
        return lambda: trd_loss(s, t, **{"margin": MARGIN, "backend": "torch", "group": world, **kwargs})

    messages = {
        "width": _message(call(s=student[..., :12 - rank])),
        "batch": _message(call(s=student[:1 + rank], t=teacher[:1 + rank])),
        "dtype": _message(call(t=teacher.to(torch.bfloat16 if rank else torch.float32))),
        "mode": _message(call(mode="spatial" if rank else "temporal", tokens_per_frame=3)),
        "frame": _message(call(mode="temporal", tokens_per_frame=6)),  # 21 tokens in all
        "local": _message(call(margin=-1.0 if rank == 0 else MARGIN)),
        "local-naive": _message(call(t=teacher[:, :-1] if rank else teacher, backend="naive")),
    }
    rank_zero = dist.new_group([0])  # every rank creates it; only rank 0 is a member
    messages["non-member"] = _message(call(group=rank_zero))
    messages["after"] = trd_loss(student, teacher, MARGIN, backend="torch", group=world).item()
    return messages


def test_disagreeing_or_bad_slices_raise_on_every_rank():
    ranks = [rank["errors"] for rank in sharded_results(2)]
    expected = {
        "width": r"ValueError: .*same student feature width Ds.*\[12, 11\]",
        "batch": r"ValueError: .*same batch size B.*\[1, 2\]",
        "dtype": r"ValueError: .*same teacher dtype.*\['float32', 'bfloat16'\]",
        "mode": r"ValueError: .*same mode.*\['temporal', 'spatial'\]",
        "frame": r"ValueError: tokens_per_frame=6 must divide N=21",
    }
    for scenario, pattern in expected.items():
        for rank in ranks:
            assert re.match(pattern, rank[scenario]), (scenario, rank[scenario])
    assert ranks[0]["local"] == "ValueError: margin must be >= 0, got -1.0"
    assert "rank [0] rejected their inputs" in ranks[1]["local"]
    assert "rank [1] rejected their inputs" in ranks[0]["local-naive"]
    assert ranks[1]["local-naive"].startswith("ValueError: student and teacher must agree in batch size")
    assert ranks[0]["non-member"] == "no error"  # a group of one: the single-process loss
    assert ranks[1]["non-member"] == "ValueError: group: this process is not a member of the process group it passed"
    assert ranks[0]["after"] == ranks[1]["after"] > 0


def double_backward_messages(rank):
    messages = {}
    for backend in ("torch", "naive"):
        student = torch.randn(1, 8 + rank, 6, requires_grad=True)
        loss = trd_loss(student, torch.randn(1, 8 + rank, 5), 0.0, backend=backend, group=dist.group.WORLD)
        (grad,) = torch.autograd.grad(loss, student, create_graph=True)
        try:
            grad.sum().backward()
            messages[backend] = "no error"
        except RuntimeError as error:
            messages[backend] = str(error)
    return messages


def test_sharded_loss_is_differentiable_once():
    for rank in sharded_results(2):
        for backend, message in rank["double backward"].items():
            assert "differentiable once" in message, (backend, message)


def compiled_losses(rank):
    """torch.compile over a step that calls the sharded loss (fullgraph: no graph break, but for the naive
    reference, which runs eagerly): (compiled, eager) loss and gradient."""
    case = make_case((20, 25), "two-pass", "temporal")
    student, teacher = case_inputs(case)
    start, end = slice_bounds(case["layout"], rank)
    results = {}
    for backend in ("torch", "triton", "naive"):
        def step(s, t):
            return 2.0 * trd_loss(s, t, MARGIN, "temporal", FRAME, backend=backend, group=dist.group.WORLD)

        runs = []
        for fn in (torch.compile(step, fullgraph=backend != "naive", backend="aot_eager"), step):
            s = student[:, start:end].clone().requires_grad_()
            loss = fn(s, teacher[:, start:end])
            loss.backward()
            runs.append((loss.detach(), s.grad))
        results[backend] = runs
    return results


def test_sharded_loss_compiles():
    for rank in sharded_results(2):
        assert set(rank["compiled"]) == {"torch", "triton", "naive"}
        for backend, (compiled, eager) in rank["compiled"].items():
            for got, expected in zip(compiled, eager):
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
