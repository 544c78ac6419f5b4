"""kernel_profile.py's variants compute what they stand for: the main loop's tile sums (one accumulator or two), and the two-pass kernels
on one shard holding every row give trd_loss's loss and gradient. (Through Triton's interpreter on CPU; the
timings themselves need a GPU.)"""

import os

if os.environ.get("VIDEOREPA_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit wraps the kernels

import pytest  # noqa: E402
import torch  # noqa: E402

import kernel_profile  # noqa: E402
from videorepa.kernels import trd_loss  # noqa: E402
from videorepa.kernels.triton_common import LaunchConfig  # noqa: E402
from videorepa.kernels.validation import validate  # noqa: E402

DEVICE = os.environ.get("VIDEOREPA_TEST_DEVICE", "cpu")


@pytest.mark.parametrize("split, group", [(0, 1), (7, 1), (0, 2)])
def test_main_loop_sums_each_tile_of_the_gram_matrix(split, group):
    x = torch.randn(2, 53, 20, device=DEVICE)  # partial last tile, K not a multiple of BLOCK_K, 4 row blocks
    config = LaunchConfig.of(4, 2, BLOCK=16, BLOCK_K=16)
    sums = kernel_profile.gram_tile_sums(x, config, split, group).cpu().double()
    gram = x.cpu().double() @ x.cpu().double().transpose(1, 2)
    padded = torch.nn.functional.pad(gram, (0, 64 - 53, 0, 64 - 53))
    expected = padded.reshape(2, 4, 16, 4, 16).sum(dim=(2, 4)).reshape(2, 16)
    torch.testing.assert_close(sums, expected, rtol=1e-5, atol=1e-4)


def test_all_rows_variant_gives_the_loss_and_gradient_of_trd_loss():
    student, teacher = kernel_profile.inputs(2, 45, 24, device=DEVICE, dtype=torch.float32)
    problem, _, run = kernel_profile.all_rows_step(student, teacher)
    assert problem.rows == (0, 45)
    clip_sums, gradient = run()
    loss = trd_loss(student, teacher, margin=kernel_profile.MARGIN, backend="naive")
    loss.backward()
    torch.testing.assert_close((clip_sums.sum() / problem.num_pairs).float(), loss.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gradient, student.grad, rtol=1e-4, atol=1e-7)


def test_executed_flops_count_the_triangle_or_the_square():
    student, teacher = kernel_profile.inputs(1, 300, 48, device="cpu", dtype=torch.float32)
    problem = validate(student, teacher, 0.1, "full", None)
    configs = (LaunchConfig.of(8, 3, BLOCK=128, BLOCK_K=64), LaunchConfig.of(8, 3, BLOCK_D=256), 1)
    triangle = kernel_profile.executed_flops(problem, configs, all_rows=False)
    square = kernel_profile.executed_flops(problem, configs, all_rows=True)
    tile = 2 * 128 * 128
    assert triangle["pass 1"] == tile * 6 * 96 and square["pass 1"] == tile * 9 * 96  # 3 blocks: 6 of 9 tiles
    assert triangle["pass 2"] == square["pass 2"] == tile * 9 * 64  # D = 48 runs one 64-wide chunk
    assert triangle["main loop"] == square["pass 1"]


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU refusal only")
def test_profile_refuses_to_run_without_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        kernel_profile.main([])
