"""TRD loss, every backend and schedule, against a float64 reference written from the formula: values, gradients
and the edges (NaN, zero and tiny-norm tokens)."""

import gc
import weakref
import zlib

import pytest
import torch

from devices import DEVICE
from videorepa import TRDLoss
from videorepa.kernels import trd_loss
from videorepa.kernels import triton_fused, triton_two_pass
from videorepa.kernels.triton_common import LaunchConfig

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = [
    pytest.param(("triton", "two-pass"), id="two-pass"),
    pytest.param(("triton", "fused"), id="fused"),
    pytest.param(("torch", "auto"), id="torch"),
    pytest.param(("naive", "auto"), id="naive"),
]
# (B, N, Ds, Dt, mode, tokens_per_frame): N = 1, a prime N, Ds != Dt, D = 1, frames that straddle the 32-token
# interpreter tiles (13 tokens) and frames longer than a tile (65 tokens).
CASES = [
    (1, 1, 1, 1, "full", None),
    (1, 37, 20, 33, "full", None),
    (2, 130, 33, 20, "full", None),
    (2, 130, 33, 20, "spatial", 13),
    (2, 130, 33, 20, "temporal", 13),
    (3, 36, 1, 20, "spatial", 12),
    (1, 130, 20, 33, "spatial", 65),
    (1, 130, 20, 33, "temporal", 65),
]
MODE_CASES = (("full", None), ("spatial", 11), ("temporal", 7))


def reference_trd(student, teacher, margin, mode="full", tokens_per_frame=None):
    """mean over kept pairs of relu(|ŝ_i·ŝ_j − t̂_i·t̂_j| − margin), in float64."""
    s, t = student.double(), teacher.double()
    s_hat = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t_hat = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    excess = torch.relu((s_hat @ s_hat.mT - t_hat @ t_hat.mT).abs() - margin)
    n = s.shape[-2]
    frame = torch.arange(n, device=s.device) // (tokens_per_frame or n)
    same = frame[:, None] == frame[None, :]
    keep = {"full": torch.ones_like(same), "spatial": same, "temporal": ~same}[mode]
    batch = s.shape[0] if s.dim() == 3 else 1
    return (excess * keep).sum() / (batch * keep.sum())


def run(backend, student, teacher, margin, mode="full", tokens_per_frame=None, teacher_grad=True):
    """Loss and gradients from a backend and from the reference, on fresh leaf copies of the same inputs."""
    name, schedule = backend
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = trd_loss(s, t, margin, mode, tokens_per_frame, backend=name, schedule=schedule)
    loss.backward()
    s_ref = student.detach().clone().requires_grad_()
    t_ref = teacher.detach().clone().requires_grad_(teacher_grad)
    ref = reference_trd(s_ref, t_ref, margin, mode, tokens_per_frame)
    ref.backward()
    return (loss, s.grad, t.grad), (ref, s_ref.grad, t_ref.grad)


def relative_error(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(got, ref, tol):
    loss, gs, gt = got
    loss_ref, gs_ref, gt_ref = ref
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loss_ref.item()) <= tol * max(abs(loss_ref.item()), 1e-3)
    for g, g_ref in ((gs, gs_ref), (gt, gt_ref)):
        if g_ref is None:
            assert g is None
            continue
        assert torch.isfinite(g).all()
        if g_ref.abs().max() <= 1e-12:
            # Mathematically zero (no active pair, or D = 1 where the normalisation's tangent space is empty):
            # only rounding may remain, held to `tol` relative to the ~1e-2 scale of these tests' gradients
            # (rounding is amplified by 1/‖x‖ for short tokens).
            assert g.abs().max() <= tol * 1e-2
        else:
            assert relative_error(g, g_ref) <= tol


# naive runs in the input dtype (bf16/fp16 Gram matrices): its low-precision loss is checked on its own below.
BACKEND_DTYPES = [
    pytest.param(b.values[0], dtype, id=f"{b.id}-{str(dtype)[6:]}")
    for b in BACKENDS
    for dtype in DTYPES
    if b.values[0][0] != "naive" or dtype == torch.float32
]


def case_inputs(case, dtype=torch.float32):
    batch, n, ds, dt = case[:4]
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))  # fresh per case, stable across runs
    return torch.randn(batch, n, ds, generator=gen).to(dtype), torch.randn(batch, n, dt, generator=gen).to(dtype)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-Ds{}-Dt{}-{}-T{}".format(*c))
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_matches_float64_reference(backend, dtype, case):
    student, teacher = case_inputs(case, dtype)
    got, ref = run(backend, student, teacher, 0.1, *case[4:])
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_naive_low_precision_loss(dtype):
    # The paper's formula in bf16/fp16 rounds the Gram entries themselves, so only the loss is held to 3e-2.
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 64, 24, generator=gen), torch.randn(2, 64, 40, generator=gen)
    got, ref = run(("naive", "auto"), student.to(dtype), teacher.to(dtype), 0.1)
    assert abs(got[0].item() - ref[0].item()) <= 3e-2 * ref[0].item()
    assert relative_error(got[1], ref[1]) <= 0.3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [0.0, 5.0])
def test_margin_extremes(backend, margin):
    # margin 0: every pair with Δ != 0 counts; margin 5 > max |Δ| = 2: the loss and every gradient are exactly 0.
    gen = torch.Generator().manual_seed(11)
    student, teacher = torch.randn(2, 45, 17, generator=gen), torch.randn(2, 45, 9, generator=gen)
    got, ref = run(backend, student, teacher, margin, "temporal", 9)
    assert_close(got, ref, 1e-4)
    if margin == 5.0:
        assert got[0].item() == 0.0 and got[1].abs().max() == 0 and got[2].abs().max() == 0
    else:
        assert got[0].item() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_dimensional_inputs_and_student_only_gradient(backend):
    gen = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(50, 12, generator=gen), torch.randn(50, 30, generator=gen)
    got, ref = run(backend, student, teacher, 0.05, teacher_grad=False)
    assert got[1].shape == (50, 12) and got[2] is None
    assert_close(got, ref, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_only_gradient(backend):
    gen = torch.Generator().manual_seed(25)
    student, teacher = torch.randn(2, 70, 12, generator=gen), torch.randn(2, 70, 30, generator=gen)
    t = teacher.to(DEVICE).clone().requires_grad_()
    trd_loss(student.to(DEVICE), t, 0.1, "temporal", 10, backend=backend[0], schedule=backend[1]).backward()
    t_ref = teacher.clone().requires_grad_()
    reference_trd(student, t_ref, 0.1, "temporal", 10).backward()
    assert relative_error(t.grad.cpu(), t_ref.grad) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(2, 19, 70, generator=gen).transpose(1, 2)  # (2, 70, 19), strides (1330, 1, 70)
    teacher = torch.randn(2, 70, 40, generator=gen)[:, :, ::2]  # (2, 70, 20), stride 2 along D
    assert not student.is_contiguous() and not teacher.is_contiguous()
    got, ref = run(backend, student, teacher, 0.1, "spatial", 14)
    assert_close(got, ref, 1e-4)


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("mode, frame", MODE_CASES, ids=[m for m, _ in MODE_CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_input_makes_loss_and_gradients_nan(backend, mode, frame, where):
    # A NaN feature must reach the loss, so a trainer's finite-loss check stops the run. v3 of the kernel dropped
    # NaN pairs from the sum and returned a finite loss. Gradients: the other clip's stay finite; in the clip
    # holding the NaN, PyTorch's formula (naive) spreads it through the NaN token's products, the fused backends
    # make both inputs' gradients NaN outright.
    gen = torch.Generator().manual_seed(19)
    inputs = {"student": torch.randn(2, 77, 21, generator=gen), "teacher": torch.randn(2, 77, 16, generator=gen)}
    inputs[where][1, 40, 3] = float("nan")
    s = inputs["student"].to(DEVICE).requires_grad_()
    t = inputs["teacher"].to(DEVICE).requires_grad_()
    loss = trd_loss(s, t, 0.1, mode, frame, backend=backend[0], schedule=backend[1])
    loss.backward()
    assert torch.isnan(loss)
    assert torch.isfinite(s.grad[0]).all() and torch.isfinite(t.grad[0]).all()
    assert torch.isnan({"student": s, "teacher": t}[where].grad[1]).any()
    if backend[0] != "naive":
        assert torch.isnan(s.grad[1]).all() and torch.isnan(t.grad[1]).all()
    with torch.no_grad():
        assert torch.isnan(trd_loss(s, t, 0.1, mode, frame, backend=backend[0], schedule=backend[1]))


# Norm of the short tokens per dtype: a zero token, and one well below 1/65504 ≈ 1.5e-5 (where float16's r·g
# overflowed in v3) that float16 still represents (its components ~4e-7 are float16 subnormals).
TINY_NORM = {torch.float32: 1e-9, torch.bfloat16: 1e-9, torch.float16: 1e-5}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_tiny_norm_tokens(backend, dtype):
    # Zero and tiny tokens never poison other tokens' gradients, in any dtype; their own gradient is what the
    # formula with F.normalize's eps gives wherever that value fits the dtype (a zero token's is ~1e12·dŝ, past
    # float16's range: inf there, as the exact value rounds to).
    gen = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(1, 70, 16, generator=gen), torch.randn(1, 70, 24, generator=gen)
    student[0, 3] = 0
    teacher[0, 7] = 0
    direction = torch.randn(16, generator=gen)
    student[0, 40] = direction / direction.norm() * TINY_NORM[dtype]
    teacher[0, 41] = teacher[0, 41] / teacher[0, 41].norm() * TINY_NORM[dtype]
    student, teacher = student.to(dtype), teacher.to(dtype)
    assert student[0, 40].abs().max() > 0  # still a tiny token, not a zero one
    got, ref = run(backend, student, teacher, 0.1, "temporal", 10)
    # naive multiplies bf16/fp16 Gram matrices: it is held to its own low-precision tolerance
    tol = 0.3 if backend[0] == "naive" and dtype != torch.float32 else TOL[dtype]
    assert abs(got[0].item() - ref[0].item()) <= tol * ref[0].item()
    for g, g_ref, short in ((got[1], ref[1], [3, 40]), (got[2], ref[2], [7, 41])):
        others = torch.ones(70, dtype=torch.bool)
        others[short] = False
        assert torch.isfinite(g[0, others]).all()
        assert relative_error(g[0, others], g_ref[0, others]) <= tol
        fits = g_ref.abs().amax(dim=-1)[0] < torch.finfo(dtype).max / 2
        for token in short:
            if fits[token]:
                assert torch.isfinite(g[0, token]).all()
                assert relative_error(g[0, token], g_ref[0, token]) <= tol
            else:
                assert (g[0, token].double().sign() == g_ref[0, token].sign()).all()


def poison(monkeypatch, *modules):
    """Buffers the kernels must fill start as NaN: any row, tile or word skipped shows up in the result."""
    def poisoned(shape, device, dtype=torch.float32):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, 85, dtype=dtype, device=device)  # no pair weight is 85

    for module in modules:
        monkeypatch.setattr(module, "new_output", poisoned)


@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_triton_writes_every_output(monkeypatch, backend):
    poison(monkeypatch, triton_two_pass, triton_fused)
    gen = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(2, 77, 21, generator=gen), torch.randn(2, 77, 35, generator=gen)
    for mode, frame in MODE_CASES:
        got, ref = run(backend, student, teacher, 0.1, mode, frame)
        assert_close(got, ref, 1e-4)


def check_explicit_configs(student, teacher, schedule, configs, mode, frame, tol=None):
    """The Triton schedule with fixed launch configurations (in place of the rule's) against the reference."""
    with pytest.MonkeyPatch.context() as patch:
        if schedule == "two-pass":
            patch.setattr(triton_two_pass, "select_configs", lambda *args: configs)
        else:
            patch.setattr(triton_fused, "select_config", lambda problem: configs)
        got, ref = run(("triton", schedule), student, teacher, 0.1, mode, frame)
    assert_close(got, ref, tol or TOL[student.dtype])


def two_pass_configs(block, block_d, group, block_k=32):
    return LaunchConfig.of(1, 1, BLOCK=block, BLOCK_K=block_k), LaunchConfig.of(1, 1, BLOCK_D=block_d), group


@pytest.mark.parametrize("configs", [
    two_pass_configs(64, 16, 2),
    two_pass_configs(32, 64, 4),
    two_pass_configs(32, 32, 5),
], ids=["block64-group2", "block32-group4", "block32-group5"])
def test_two_pass_tilings(configs):
    # 180 tokens: 3 or 6 row blocks, so every super-tile grid overhangs the last block; 64- and 32-token map tiles;
    # D tiles that do not divide D; frames shorter (12) and longer (90) than a tile.
    gen = torch.Generator().manual_seed(10)
    student, teacher = torch.randn(2, 180, 40, generator=gen), torch.randn(2, 180, 24, generator=gen)
    for mode, frame in (("full", None), ("spatial", 12), ("spatial", 90), ("temporal", 60)):
        check_explicit_configs(student, teacher, "two-pass", configs, mode, frame)


def test_two_pass_wide_feature_chunks():
    # The rule's 256-wide pass-2 chunks on widths they do not divide (300, 260), both gradients.
    gen = torch.Generator().manual_seed(16)
    student, teacher = torch.randn(1, 70, 300, generator=gen), torch.randn(1, 70, 260, generator=gen)
    check_explicit_configs(student.bfloat16(), teacher.bfloat16(), "two-pass", two_pass_configs(64, 256, 1, 64),
                           "full", None)


def test_fused_tall_and_wide_tiles():
    # Unequal row and column tiles exercise the spatial column range and the masks.
    gen = torch.Generator().manual_seed(10)
    student, teacher = torch.randn(2, 90, 40, generator=gen), torch.randn(2, 90, 24, generator=gen)
    for block_m, block_n in ((16, 64), (64, 16)):
        config = LaunchConfig.of(1, 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=16, BLOCK_D=32)
        for mode, frame in (("full", None), ("spatial", 18), ("temporal", 30)):
            check_explicit_configs(student, teacher, "fused", config, mode, frame)


def _candidate_cases():
    """Every launch candidate with the input dtype of its family. The interpreter ignores warps and stages, so on
    CPU a tile shape is run once per family; on a GPU every candidate runs as a launch would run it."""
    cases, seen = [], set()
    for family, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        runs = [("two-pass", (pass1, pass2, 2)) for pass1 in triton_two_pass.PASS1_CANDIDATES[family]
                for pass2 in triton_two_pass.PASS2_CANDIDATES[family]]
        runs += [("fused", config) for config in triton_fused.CANDIDATES[family]]
        for schedule, configs in runs:
            parts = configs[:2] if schedule == "two-pass" else (configs,)
            key = (family, schedule) + tuple(p.params if DEVICE.type == "cpu" else p for p in parts)
            if key not in seen:
                seen.add(key)
                cases.append(pytest.param(schedule, configs, dtype,
                                          id=f"{schedule}-{family}-" + "-".join(_name(p) for p in parts)))
    return cases


def _name(config):
    return "-".join(f"{k.replace('BLOCK_', '').replace('BLOCK', 'T')}{v}" for k, v in config.params) + \
        f"-w{config.num_warps}s{config.num_stages}"


@pytest.mark.parametrize("schedule, configs, dtype", _candidate_cases())
def test_every_launch_candidate_is_correct(schedule, configs, dtype):
    # bench/sweep_configs.py may time any of these on a GPU and the rule may pick any of them: each
    # must tile odd shapes correctly with its own warp count and pipeline depth.
    gen = torch.Generator().manual_seed(15)
    student, teacher = torch.randn(1, 150, 70, generator=gen), torch.randn(1, 150, 33, generator=gen)
    for mode, frame in (("temporal", 30), ("spatial", 75)):
        check_explicit_configs(student.to(dtype), teacher.to(dtype), schedule, configs, mode, frame)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0][0] != "naive"])
def test_bitwise_reproducible(backend):
    gen = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(2, 100, 24, generator=gen), torch.randn(2, 100, 24, generator=gen)
    results = [run(backend, student, teacher, 0.1)[0] for _ in range(2)]
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", ["two-pass", "fused"])
def test_no_gradient_work_without_grad(monkeypatch, schedule):
    launched = []
    for module, name in ((triton_two_pass, "_pass1_kernel"), (triton_two_pass, "_pass2_kernel"),
                         (triton_fused, "_fused_kernel")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, _Recorder(kernel, name, launched))
    student = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    teacher = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        loss = trd_loss(student, teacher, backend="triton", schedule=schedule)
    assert not loss.requires_grad
    assert launched == [("_pass1_kernel", False)]  # the loss alone: no map, no gradient kernel
    launched.clear()
    trd_loss(student, teacher.detach(), backend="triton", schedule=schedule).backward()
    expected = [("_pass1_kernel", True), ("_pass2_kernel", None)] if schedule == "two-pass" else \
        [("_fused_kernel", (True, False))]
    assert launched == expected
    assert student.grad is not None and teacher.grad is None


class _Recorder:
    """Stands in for a Triton kernel: records (name, what it was asked to produce), then launches it."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            asked = {"_pass1_kernel": lambda: kwargs["WRITE_MAP"], "_pass2_kernel": lambda: None,
                     "_fused_kernel": lambda: (kwargs["GRAD_S"], kwargs["GRAD_T"])}[self.name]()
            self.log.append((self.name, asked))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scales_gradient(backend):
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(40, 10, generator=gen).to(DEVICE).requires_grad_()
    teacher = torch.randn(40, 10, generator=gen).to(DEVICE).requires_grad_()

    def grads(weight):
        loss = trd_loss(student, teacher, backend=backend[0], schedule=backend[1])
        return torch.autograd.grad(weight * loss, (student, teacher))

    for once, scaled in zip(grads(1.0), grads(-2.5)):
        torch.testing.assert_close(scaled, -2.5 * once)


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_eager_calls_skip_the_operator_dispatch_and_backward_fills_nothing(backend):
    # Eager forward and backward run the operators' implementations directly (a custom operator's Python dispatch
    # costs ~50 µs per call on an H100 machine), and backward fills no zero gradients for the outputs that get none
    # (the pair map, the gradients kept from forward), each as large as the map or the inputs.
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(27)
    student = torch.randn(2, 40, 10, generator=gen).to(DEVICE).requires_grad_()
    teacher = torch.randn(2, 40, 6, generator=gen).to(DEVICE).requires_grad_()
    with profile(activities=[ProfilerActivity.CPU]) as forward:
        loss = trd_loss(student, teacher, backend=backend[0], schedule=backend[1])
    with profile(activities=[ProfilerActivity.CPU]) as backward:
        loss.backward()
    assert type(loss.grad_fn).__name__ in ("TRDTwoPassBackward", "TRDLossAndGradientBackward")
    for prof in (forward, backward):
        names = {event.name for event in prof.events()}
        assert [name for name in names if name.startswith("aten::")]  # the profiler saw the call's operations
        assert not [name for name in names if name.startswith("videorepa::")]
    assert not [event.name for event in backward.events() if event.name.startswith("aten::zero")]
    assert student.grad is not None and teacher.grad is not None


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_retain_graph_then_second_backward_and_no_double_backward(backend):
    gen = torch.Generator().manual_seed(21)
    student = torch.randn(2, 40, 10, generator=gen).to(DEVICE).requires_grad_()
    teacher = torch.randn(2, 40, 6, generator=gen).to(DEVICE)
    loss = trd_loss(student, teacher, backend=backend[0], schedule=backend[1])
    loss.backward(retain_graph=True)
    first = student.grad.clone()
    loss.backward()
    torch.testing.assert_close(student.grad, 2 * first)
    (grad,) = torch.autograd.grad(trd_loss(student, teacher, backend=backend[0], schedule=backend[1]), student,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_input_without_gradient_is_not_kept_for_backward(backend):
    # Only what backward needs survives forward: with the teacher alone getting a gradient, the student's memory is
    # free before backward runs (a trainer may hold many such losses at once, e.g. under gradient accumulation).
    gen = torch.Generator().manual_seed(23)
    student = torch.randn(2, 40, 10, generator=gen).to(DEVICE)
    teacher = torch.randn(2, 40, 6, generator=gen).to(DEVICE).requires_grad_()
    loss = trd_loss(student, teacher, backend=backend[0], schedule=backend[1])
    alive = weakref.ref(student)
    del student
    gc.collect()
    assert alive() is None
    loss.backward()
    assert teacher.grad is not None


@pytest.mark.parametrize("backend", BACKENDS[1:3])
def test_grad_output_is_applied_in_float32(backend):
    # The gradient kept from forward (bf16 here) is scaled by grad_output once, in float32: rounding grad_output to
    # bf16 first (0.3 -> 0.30078125) would bias every step by 0.26 %.
    gen = torch.Generator().manual_seed(24)
    student = torch.randn(2, 40, 10, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    teacher = torch.randn(2, 40, 6, generator=gen).to(DEVICE, torch.bfloat16)
    (once,) = torch.autograd.grad(trd_loss(student, teacher, backend=backend[0], schedule=backend[1]), student)
    (scaled,) = torch.autograd.grad(0.3 * trd_loss(student, teacher, backend=backend[0], schedule=backend[1]),
                                    student)
    assert torch.equal(scaled, (once.float() * 0.3).to(torch.bfloat16))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0][0] in ("torch", "naive")])
def test_float64_gradients_stay_float64(backend):
    # float64 gradients keep float64's precision (not float32's 1e-8) through the scaling by grad_output and by
    # 1/P. The loss itself is float32, so the weight is one float32 holds exactly.
    gen = torch.Generator().manual_seed(25)
    student, teacher = torch.randn(2, 40, 10, generator=gen).double(), torch.randn(2, 40, 6, generator=gen).double()
    for weight in (1.0, 0.375):
        s, t = student.to(DEVICE).clone().requires_grad_(), teacher.to(DEVICE).clone().requires_grad_()
        (weight * trd_loss(s, t, backend=backend[0])).backward()
        s_ref, t_ref = student.to(DEVICE).clone().requires_grad_(), teacher.to(DEVICE).clone().requires_grad_()
        (weight * reference_trd(s_ref, t_ref, 0.1, "full", None)).backward()
        assert s.grad.dtype == torch.float64
        assert relative_error(s.grad, s_ref.grad) < 1e-12 and relative_error(t.grad, t_ref.grad) < 1e-12


@pytest.mark.skipif(DEVICE.type != "cuda" or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_inputs_on_a_gpu_other_than_the_current_one(backend):
    # Triton launches on the current device: the kernels must switch to the inputs' GPU.
    gen = torch.Generator().manual_seed(26)
    student, teacher = torch.randn(2, 70, 24, generator=gen), torch.randn(2, 70, 16, generator=gen)
    with torch.cuda.device(0):
        s = student.to("cuda:1").requires_grad_()
        loss = trd_loss(s, teacher.to("cuda:1"), backend=backend[0], schedule=backend[1])
        loss.backward()
    s_ref = student.clone().requires_grad_()
    ref = reference_trd(s_ref, teacher, 0.1)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * ref.item()
    assert relative_error(s.grad.cpu(), s_ref.grad) <= 1e-4


def test_module_wrapper_matches_function():
    gen = torch.Generator().manual_seed(14)
    student, teacher = torch.randn(2, 24, 8, generator=gen), torch.randn(2, 24, 6, generator=gen)
    module = TRDLoss(margin=0.05, mode="spatial", tokens_per_frame=6, backend="torch")
    expected = reference_trd(student, teacher, 0.05, "spatial", 6)
    assert abs(module(student, teacher).item() - expected.item()) < 1e-6
    assert "spatial" in repr(module) and "schedule='auto'" in repr(module)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_and_teacher_dtypes_may_differ(backend):
    gen = torch.Generator().manual_seed(16)
    student = torch.randn(2, 40, 24, generator=gen).to(torch.bfloat16)
    teacher = torch.randn(2, 40, 12, generator=gen)  # float32, as a cached teacher often is
    got, ref = run(backend, student, teacher, 0.1)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_close(got, ref, 3e-2 if backend[0] != "naive" else 0.3)


@pytest.mark.parametrize("backend", BACKENDS[:3])
def test_fused_backends_ignore_autocast(backend):
    # In a bf16-autocast training step the fused paths still accumulate in float32 for float32 inputs.
    gen = torch.Generator().manual_seed(17)
    student, teacher = torch.randn(2, 60, 24, generator=gen), torch.randn(2, 60, 12, generator=gen)
    plain, ref = run(backend, student, teacher, 0.1)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        autocast, _ = run(backend, student, teacher, 0.1)
    for a, b in zip(plain, autocast):
        assert torch.equal(a, b)
    assert_close(autocast, ref, 1e-4)
