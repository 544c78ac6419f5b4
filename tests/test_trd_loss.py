"""TRD loss, every backend, against a float64 reference written from the formula: values and gradients."""

import functools
import os
import zlib

import pytest
import torch

from videorepa import TRDLoss
from videorepa.kernels import trd_loss
from videorepa.kernels import trd_triton
from videorepa.kernels.fused import fused_trd_loss
from videorepa.kernels.validation import validate

DEVICE = torch.device(os.environ.get("VIDEOREPA_TEST_DEVICE", "cpu"))
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
BACKENDS = [
    pytest.param(("triton", True), id="triton"),
    pytest.param(("triton", False), id="triton-symmetric"),
    pytest.param(("torch", True), id="torch"),
    pytest.param(("naive", True), id="naive"),
]
# (B, N, Ds, Dt, mode, tokens_per_frame): N = 1, a prime N, Ds != Dt, D = 1, frames that straddle the 32-row
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
    name, deterministic = backend
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    loss = trd_loss(s, t, margin, mode, tokens_per_frame, backend=name, deterministic=deterministic)
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
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
    if b.values[0][0] != "naive" or dtype == torch.float32
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-Ds{}-Dt{}-{}-T{}".format(*c))
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPES)
def test_matches_float64_reference(backend, dtype, case):
    batch, n, ds, dt, mode, frame = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))  # fresh per case, stable across runs
    student = torch.randn(batch, n, ds, generator=gen).to(dtype)
    teacher = torch.randn(batch, n, dt, generator=gen).to(dtype)
    got, ref = run(backend, student, teacher, 0.1, mode, frame)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    assert_close(got, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_naive_low_precision_loss(dtype):
    # The paper's formula in bf16/fp16 rounds the Gram entries themselves, so only the loss is held to 3e-2.
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 64, 24, generator=gen), torch.randn(2, 64, 40, generator=gen)
    got, ref = run(("naive", True), student.to(dtype), teacher.to(dtype), 0.1)
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
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(2, 19, 70, generator=gen).transpose(1, 2)  # (2, 70, 19), strides (1330, 1, 70)
    teacher = torch.randn(2, 70, 40, generator=gen)[:, :, ::2]  # (2, 70, 20), stride 2 along D
    assert not student.is_contiguous() and not teacher.is_contiguous()
    got, ref = run(backend, student, teacher, 0.1, "spatial", 14)
    assert_close(got, ref, 1e-4)


def test_zero_token_vectors_follow_normalize_eps():
    # A zero token normalises to zero (F.normalize's eps floor); its gradient is r·dŝ with no radial term.
    gen = torch.Generator().manual_seed(8)
    student, teacher = torch.randn(1, 40, 16, generator=gen), torch.randn(1, 40, 16, generator=gen)
    student[0, 3] = 0
    teacher[0, 7] = 0
    for backend in [b.values[0] for b in BACKENDS]:
        got, ref = run(backend, student, teacher, 0.1)
        assert_close(got, ref, 1e-4)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "symmetric"])
def test_triton_writes_every_output(monkeypatch, deterministic):
    # Buffers the kernel must fill start as NaN: any row or tile it skips shows up in the result.
    monkeypatch.setattr(trd_triton, "new_output", lambda shape, device: torch.full(shape, float("nan"), device=device))
    gen = torch.Generator().manual_seed(9)
    student, teacher = torch.randn(2, 77, 21, generator=gen), torch.randn(2, 77, 35, generator=gen)
    for mode, frame in (("full", None), ("spatial", 11), ("temporal", 7)):
        got, ref = run(("triton", deterministic), student, teacher, 0.1, mode, frame)
        assert_close(got, ref, 1e-4)


def check_explicit_config(student, teacher, deterministic, config, mode, frame):
    """The Triton engine with one fixed tile configuration against the reference."""
    student, teacher = student.to(DEVICE), teacher.to(DEVICE)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    engine = functools.partial(trd_triton.triton_engine, deterministic=deterministic, config=config)
    loss = fused_trd_loss(validate(s, t, 0.1, mode, frame), engine)
    loss.backward()
    s_ref, t_ref = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    ref = reference_trd(s_ref, t_ref, 0.1, mode, frame)
    ref.backward()
    assert_close((loss, s.grad, t.grad), (ref, s_ref.grad, t_ref.grad), TOL[student.dtype])


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 16, "BLOCK_D": 16},
    {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "BLOCK_D": 32},
], ids=["tall-columns", "tall-rows"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "symmetric"])
def test_triton_other_tile_shapes(config, deterministic):
    # Unequal row and column tiles exercise the symmetric diagonal handling and the spatial column range.
    gen = torch.Generator().manual_seed(10)
    student, teacher = torch.randn(2, 90, 40, generator=gen), torch.randn(2, 90, 24, generator=gen)
    for mode, frame in (("full", None), ("spatial", 18), ("temporal", 30)):
        check_explicit_config(student, teacher, deterministic, config, mode, frame)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_deterministic_path_is_bitwise_reproducible(backend):
    gen = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(2, 100, 24, generator=gen), torch.randn(2, 100, 24, generator=gen)
    results = [run((backend, True), student, teacher, 0.1)[0] for _ in range(2)]
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_no_gradient_work_without_grad(monkeypatch):
    calls = []
    real_engine = trd_triton.triton_engine
    monkeypatch.setattr(trd_triton, "triton_engine", lambda *a, **k: calls.append(a[3:5]) or real_engine(*a, **k))
    student = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    teacher = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    with torch.no_grad():
        loss = trd_loss(student, teacher, backend="triton")
    assert not loss.requires_grad
    trd_loss(student, teacher.detach(), backend="triton").backward()
    trd_loss(student.detach(), teacher, backend="triton").backward()
    assert calls == [(False, False), (True, False), (False, True)]
    assert student.grad is not None and teacher.grad is not None


def test_grad_output_scales_gradient():
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(40, 10, generator=gen, requires_grad=True)
    teacher = torch.randn(40, 10, generator=gen)
    once = torch.autograd.grad(trd_loss(student, teacher, backend="torch"), student)[0]
    scaled = torch.autograd.grad(-2.5 * trd_loss(student, teacher, backend="torch"), student)[0]
    torch.testing.assert_close(scaled, -2.5 * once)


def test_module_wrapper_matches_function():
    gen = torch.Generator().manual_seed(14)
    student, teacher = torch.randn(2, 24, 8, generator=gen), torch.randn(2, 24, 6, generator=gen)
    module = TRDLoss(margin=0.05, mode="spatial", tokens_per_frame=6, backend="torch")
    expected = reference_trd(student, teacher, 0.05, "spatial", 6)
    assert abs(module(student, teacher).item() - expected.item()) < 1e-6
    assert "spatial" in repr(module)


def _autotune_cases():
    """Each autotune candidate with the input dtype whose family it belongs to (on a GPU a 16-bit tile shape with
    float32 operands may not even fit in shared memory, and the autotuner never pairs them)."""
    families = ((trd_triton._CONFIGS_16BIT, torch.bfloat16), (trd_triton._CONFIGS_FP32, torch.float32))
    return [pytest.param(config, dtype, id="{}-M{BLOCK_M}-N{BLOCK_N}-K{BLOCK_K}-D{BLOCK_D}-w{num_warps}-s{num_stages}"
                         .format(str(dtype)[6:], **config.all_kwargs()))
            for configs, dtype in families for config in configs]


@pytest.mark.parametrize("config, dtype", _autotune_cases())
def test_every_autotune_config_is_correct(config, dtype):
    # The autotuner on a GPU may pick any of these; each must tile odd shapes correctly in both schedules, with
    # its own warp count and pipeline depth.
    gen = torch.Generator().manual_seed(15)
    student, teacher = torch.randn(1, 150, 70, generator=gen), torch.randn(1, 150, 33, generator=gen)
    for deterministic, mode, frame in ((True, "temporal", 30), (False, "spatial", 75)):
        check_explicit_config(student.to(dtype), teacher.to(dtype), deterministic, config.all_kwargs(), mode, frame)


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_and_teacher_dtypes_may_differ(backend):
    gen = torch.Generator().manual_seed(16)
    student = torch.randn(2, 40, 24, generator=gen).to(torch.bfloat16)
    teacher = torch.randn(2, 40, 12, generator=gen)  # float32, as a cached teacher often is
    got, ref = run(backend, student, teacher, 0.1)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_close(got, ref, 3e-2 if backend[0] != "naive" else 0.3)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_backends_ignore_autocast(backend):
    # In a bf16-autocast training step the fused paths still accumulate in float32 for float32 inputs.
    gen = torch.Generator().manual_seed(17)
    student, teacher = torch.randn(2, 60, 24, generator=gen), torch.randn(2, 60, 12, generator=gen)
    plain, ref = run((backend, True), student, teacher, 0.1)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        autocast, _ = run((backend, True), student, teacher, 0.1)
    for a, b in zip(plain, autocast):
        assert torch.equal(a, b)
    assert_close(autocast, ref, 1e-4)
