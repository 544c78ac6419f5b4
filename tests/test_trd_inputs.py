"""Bad arguments fail early with a message naming the argument; memory of the blockwise backend stays linear in N."""

import pytest
import torch

import triton
import triton.language as tl

from devices import DEVICE
from videorepa.kernels import count_pairs, trd_loss
from videorepa.kernels.triton_two_pass import _triangle_row
from videorepa.memory import PeakMemory

S, T = torch.randn(2, 12, 8), torch.randn(2, 12, 5)

BAD_CALLS = [
    (dict(student=S, teacher=torch.randn(3, 12, 5)), ValueError, r"batch size and token count.*\(2, 12, 8\).*\(3, 12, 5\)"),
    (dict(student=S, teacher=torch.randn(2, 11, 5)), ValueError, r"\(B, N\).*\(2, 11, 5\)"),
    (dict(student=S, teacher=torch.randn(12, 5)), ValueError, r"must both be 2-D or both 3-D"),
    (dict(student=torch.randn(2, 2, 12, 8), teacher=T), ValueError, r"student must be \(N, D\) or \(B, N, D\).*\(2, 2, 12, 8\)"),
    (dict(student=S, teacher=torch.randn(5)), ValueError, r"teacher must be \(N, D\) or \(B, N, D\)"),
    (dict(student=S.long(), teacher=T), TypeError, r"student must have a floating dtype.*int64"),
    (dict(student=S, teacher=T.int()), TypeError, r"teacher must have a floating dtype.*int32"),
    (dict(student=S.numpy(), teacher=T), TypeError, r"student must be a torch.Tensor"),
    (dict(student=S, teacher=T.to("meta")), ValueError, r"student is on cpu but teacher is on meta"),
    (dict(student=S, teacher=T, mode="diagonal"), ValueError, r"mode must be one of.*'diagonal'"),
    (dict(student=S, teacher=T, backend="cuda"), ValueError, r"backend must be one of.*'cuda'"),
    (dict(student=S, teacher=T, mode="spatial"), ValueError, r"mode 'spatial' needs tokens_per_frame"),
    (dict(student=S, teacher=T, mode="temporal", tokens_per_frame=5), ValueError, r"tokens_per_frame=5.*divide N=12"),
    (dict(student=S, teacher=T, mode="spatial", tokens_per_frame=0), ValueError, r"tokens_per_frame=0"),
    (dict(student=S, teacher=T, mode="spatial", tokens_per_frame=4.0), TypeError, r"tokens_per_frame must be an int"),
    (dict(student=S, teacher=T, mode="temporal", tokens_per_frame=12), ValueError, r"at least two frames"),
    (dict(student=S, teacher=T, margin=-0.1), ValueError, r"margin must be >= 0, got -0.1"),
    (dict(student=S, teacher=T, margin=float("nan")), ValueError, r"margin must be >= 0"),
    (dict(student=S, teacher=T, margin="0.1"), TypeError, r"margin must be a number"),
    (dict(student=torch.randn(2, 0, 8), teacher=torch.randn(2, 0, 5)), ValueError, r"at least one clip and one token"),
    (dict(student=torch.randn(0, 4, 8), teacher=torch.randn(0, 4, 5)), ValueError, r"at least one clip and one token"),
    (dict(student=torch.randn(2, 12, 0), teacher=T), ValueError, r"feature width must be at least 1"),
    (dict(student=S.double(), teacher=T.double(), backend="triton"), TypeError, r"backend 'triton' takes float32.*float64"),
    (dict(student=S, teacher=T, schedule="symmetric"), ValueError, r"schedule must be one of.*'symmetric'"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_CALLS, ids=[m for _, _, m in BAD_CALLS])
def test_bad_input_is_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        trd_loss(**kwargs)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend 'triton' needs CUDA tensors.*cpu"):
        trd_loss(S, T, backend="triton")


def test_auto_backend_looks_at_both_dtypes():
    # On CUDA the Triton kernels take float32/bfloat16/float16; a float64 teacher (or student) goes to the blockwise
    # engine instead of failing inside the Triton backend's dtype check.
    from videorepa.kernels.api import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.bfloat16, torch.float64) == "torch"
    assert resolve_backend("auto", cuda, torch.float64, torch.float32) == "torch"
    assert resolve_backend("auto", cuda, torch.bfloat16, torch.float32) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16, torch.bfloat16) == "torch"


def test_auto_uses_blockwise_torch_on_cpu_and_float64_works():
    s, t = S.double().requires_grad_(), T.double()
    loss = trd_loss(s, t, backend="auto")
    loss.backward()
    expected = trd_loss(s.detach(), t, backend="naive")
    assert loss.dtype == torch.float32 and abs(loss.item() - expected.item()) < 1e-7
    assert s.grad.dtype == torch.float64


def test_pair_counts():
    assert count_pairs(12, 12, "full") == 144
    assert count_pairs(12, 4, "spatial") == 3 * 16
    assert count_pairs(12, 4, "temporal") == 144 - 48


def extra_peak_mib(backend, tokens, width=16):
    student = torch.randn(tokens, width, requires_grad=True)
    teacher = torch.randn(tokens, width)
    with PeakMemory("cpu") as mem:
        trd_loss(student, teacher, backend=backend).backward()
    return mem.peak_mib


def test_torch_backend_memory_grows_linearly_in_tokens():
    small, large = extra_peak_mib("torch", 1024), extra_peak_mib("torch", 4096)
    naive_small, naive_large = extra_peak_mib("naive", 1024), extra_peak_mib("naive", 4096)
    # 4× the tokens: linear memory grows ~4×, the N×N Gram matrices of the naive path ~16×.
    assert large / small < 5
    assert naive_large / naive_small > 12
    assert large < 0.1 * naive_large


def test_peak_memory_counts_live_tensors_only():
    with PeakMemory("cpu") as mem:
        big = torch.empty(2**20)  # 4 MiB
        view = big[::2]
        del big, view
        torch.zeros(2**19)  # 2 MiB, after the 4 MiB block is gone
    assert mem.peak_mib == 4.0


def test_launch_configs_are_chosen_by_rule(monkeypatch):
    # The same problem gets the same tiles in every process (no timing), hence the same bits; the rule follows the
    # dtype family, the problem's size and the gradients asked for, and the H100 sweep's timings.
    from videorepa.kernels import triton_fused, triton_two_pass
    from videorepa.kernels.validation import validate

    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def problem(tokens, student_dtype=torch.bfloat16, teacher_dtype=torch.bfloat16, dim=768):
        return validate(torch.empty(4, tokens, dim, dtype=student_dtype),
                        torch.empty(4, tokens, dim, dtype=teacher_dtype), 0.1, "full", None)

    select = triton_two_pass.select_configs
    paper, large = problem(3600), problem(32400)
    assert select(paper, True, False) == select(problem(3600), True, False)
    pass1, pass2, group = select(paper, True, False)
    assert (pass1["BLOCK"], pass2["BLOCK_D"], group) == (128, 256, 1)  # 11 MB of operands per clip: L2-resident
    assert select(problem(3600, dim=1920), True, False)[1]["BLOCK_D"] == 128  # 256 would leave half a chunk idle
    assert select(large, True, False)[2] == 8  # 100 MB per clip: grouped for L2 reuse
    assert select(problem(1000), True, False)[0]["BLOCK"] == 64
    assert select(paper, True, True)[0]["BLOCK"] == 64  # both radial sums at 128 spill
    assert select(problem(3600, torch.float16, torch.float16), True, False)[0]["BLOCK"] == 64
    assert select(problem(3600, torch.float16, torch.float16), False, False)[0]["BLOCK"] == 128
    mixed = select(problem(3600, torch.bfloat16, torch.float32), True, False)
    assert mixed[0] in triton_two_pass.PASS1_CANDIDATES["fp32"] and mixed[1] in triton_two_pass.PASS2_CANDIDATES["fp32"]
    assert select(problem(3600), False, True)[1]["BLOCK_D"] == 256  # the teacher's width alone decides
    assert triton_fused.select_config(paper) == triton_fused.CANDIDATES["bf16"][0]
    for other in (torch.float16, torch.float32):  # a bf16 input never gets 32-wide D chunks (NaN on an H100)
        assert triton_fused.select_config(problem(3600, torch.bfloat16, other))["BLOCK_D"] == 64
    assert triton_fused.select_config(problem(40, torch.float32, torch.float32))["BLOCK_M"] == 64


@pytest.mark.parametrize("backend", ["torch", "triton", "naive"])
def test_full_mode_ignores_tokens_per_frame(backend):
    # Every pair counts in "full" mode, whatever tokens_per_frame says (a caller may pass its model's value).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # else the interpreter's
    student, teacher = S.to(device), T.to(device)
    s = student.clone().requires_grad_()
    loss = trd_loss(s, teacher, mode="full", tokens_per_frame=5.0, backend=backend)
    loss.backward()
    assert loss.item() == trd_loss(student, teacher, mode="full", backend=backend).item()


def test_strides_past_int32_offsets_are_read_right():
    """A clip whose token stride puts its last token 2³¹ elements in (here a (1, 3, 16) view with token stride 2³⁰,
    as a transposed sequence-first tensor would have) was read at wrapped int32 offsets by the Triton kernels,
    silently; now it is copied contiguous first, and a clip of more than 2³¹ elements is refused."""
    from videorepa.kernels.triton_common import check_inputs, indexable

    buffer = torch.empty(2 * 2**30 + 16, dtype=torch.float16, device=DEVICE)  # only three rows are ever written
    student = buffer.as_strided((1, 3, 16), (48, 2**30, 1))
    gen = torch.Generator().manual_seed(0)
    student.copy_(torch.randn(1, 3, 16, generator=gen))
    student = student.detach().requires_grad_()
    teacher = torch.randn(1, 3, 8, generator=gen).half().to(DEVICE)
    contiguous = student.detach().contiguous()
    expected = trd_loss(contiguous, teacher, 0.0, backend="naive")  # float16 rounding apart (~2e-3)
    for schedule in ("two-pass", "fused"):
        loss = trd_loss(student, teacher, 0.0, backend="triton", schedule=schedule)
        assert torch.equal(loss, trd_loss(contiguous, teacher, 0.0, backend="triton", schedule=schedule))
        torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-5)
    loss.backward()
    assert student.grad.shape == (1, 3, 16) and torch.isfinite(student.grad).all()
    wide = torch.empty_strided((1, 3, 16), (48, 2**30, 1), device="meta")
    assert indexable(wide).is_contiguous() and indexable(student) is not student
    assert indexable(S) is S  # nothing copied where the offsets fit
    huge = torch.empty(1, 2**21 + 1, 1024, device="meta", dtype=torch.bfloat16)  # N·D = 2³¹ + 1024
    with pytest.raises(ValueError, match=r"int32.*student holds N·D = 2147484672 elements.*backend='torch'"):
        check_inputs(huge, huge)
    with pytest.raises(ValueError, match=r"strides of teacher.*pass it contiguous"):
        check_inputs(huge[:, :4], wide)


def test_auto_backend_takes_torch_for_clips_past_int32(monkeypatch):
    from videorepa.kernels import api

    monkeypatch.setattr(api, "resolve_backend", lambda *args: "triton")  # as on CUDA
    huge = torch.empty(1, 2**21 + 1, 1024, device="meta", dtype=torch.bfloat16)
    assert api._check_options(huge, huge, "auto", "auto")[0] == "torch"
    with pytest.raises(ValueError, match="use backend='torch'"):
        api._check_options(huge, huge, "triton", "auto")


@triton.jit
def _rows_of(P, OUT, n, M, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + i, _triangle_row(tl.load(P + i, mask=i < M, other=0), n), mask=i < M)


def test_triangle_walk_finds_its_row_past_int32_squares():
    """Pass 1's triangle of n super-rows maps program p to its row through sqrt((2n + 1)² − 8p): (2n + 1)² passes
    int32 at n ≥ 23,170, where the rows came out wrong, and row·n at n ≥ 46,341."""
    for n in (1, 9, 30000, 50000):
        row = torch.arange(n, dtype=torch.int64)
        starts = row * n - row * (row - 1) // 2
        p = torch.cat([starts, starts[1:] - 1, starts + 1, torch.randint(0, n * (n + 1) // 2, (4000,))])
        p = p[p < n * (n + 1) // 2].to(torch.int32)
        out = torch.empty_like(p, device=DEVICE)
        _rows_of[(triton.cdiv(len(p), 1024),)](p.to(DEVICE), out, n, len(p), BLOCK=1024)
        assert torch.equal(out.cpu().long(), torch.searchsorted(starts, p.long(), right=True) - 1), n
