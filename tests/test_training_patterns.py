"""The TRD loss inside the usual training patterns, each against the plain eager result of the same step: gradient
accumulation, activation checkpointing (reentrant and not, around the module and around module and loss), bf16
autocast with float32 master weights, retain_graph, double backward; DDP and FSDP2 (2 gloo processes), also with
the token axis split across the processes."""

import functools
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from devices import DEVICE, TWO_PROCESSES_POSSIBLE
from multiprocess import run_processes
from videorepa.kernels import trd_loss

BACKENDS = {"two-pass": ("triton", "two-pass"), "fused": ("triton", "fused"), "torch": ("torch", "auto"),
            "naive": ("naive", "auto")}
FRAME, TOKENS, WIDTH = 8, 24, 10


def make_module(seed=0, device=DEVICE) -> nn.Module:
    """Stands in for the network that produces the student tokens (a DiT block and its projector)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, 32), nn.GELU(), nn.Linear(32, 16)).to(device)


def make_batch(clips=2, seed=1, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(clips, TOKENS, WIDTH, generator=gen).to(device),
            torch.randn(clips, TOKENS, 12, generator=gen).to(device))


def loss_of(student, teacher, backend, **kwargs):
    name, schedule = BACKENDS[backend]
    return trd_loss(student, teacher, 0.1, "temporal", FRAME, backend=name, schedule=schedule, **kwargs)


def gradients(module):
    return [p.grad.clone() for p in module.parameters()]


def plain_step(backend, x, teacher, scale=1.0):
    module = make_module()
    (scale * loss_of(module(x), teacher, backend)).backward()
    return gradients(module)


def assert_same(got, expected, rtol=1e-5):
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


def accumulated(module, x, teacher, backend):
    for clip in range(x.shape[0]):  # one clip per micro-batch, backward after each, then one optimizer step
        (loss_of(module(x[clip:clip + 1]), teacher[clip:clip + 1], backend) / x.shape[0]).backward()


def checkpointed(module, x, teacher, backend, reentrant):
    x = x.clone().requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad
    loss_of(checkpoint(module, x, use_reentrant=reentrant), teacher, backend).backward()


def checkpointed_with_loss(module, x, teacher, backend, reentrant):
    x = x.clone().requires_grad_(reentrant)
    checkpoint(lambda x: loss_of(module(x), teacher, backend), x, use_reentrant=reentrant).backward()


def retained(module, x, teacher, backend):
    loss = loss_of(module(x), teacher, backend)
    loss.backward(retain_graph=True)
    loss.backward()  # the same graph again: twice the gradient


PATTERNS = {
    "accumulation": (accumulated, 1.0),
    "checkpoint-reentrant": (functools.partial(checkpointed, reentrant=True), 1.0),
    "checkpoint": (functools.partial(checkpointed, reentrant=False), 1.0),
    "checkpoint-with-loss-reentrant": (functools.partial(checkpointed_with_loss, reentrant=True), 1.0),
    "checkpoint-with-loss": (functools.partial(checkpointed_with_loss, reentrant=False), 1.0),
    "retain-graph": (retained, 2.0),
}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pattern_matches_plain_step(backend, pattern):
    run, scale = PATTERNS[pattern]
    x, teacher = make_batch()
    module = make_module()
    run(module, x, teacher, backend)
    assert_same(gradients(module), plain_step(backend, x, teacher, scale))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_with_float32_master_weights(backend):
    # The module runs in bf16 under autocast and hands bf16 tokens to the loss; the float32 weights get float32
    # gradients within bf16's rounding of the float32 step's.
    x, teacher = make_batch()
    module = make_module()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        student = module(x)
        loss = loss_of(student, teacher, backend)
    assert student.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    plain = plain_step(backend, x, teacher)
    for got, expected in zip(gradients(module), plain):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        assert ((got - expected).norm() / expected.norm()).item() < 0.05
    # Same step with the module cast to bf16 by hand: the loss sees the same tokens, so the same value.
    bf16 = make_module().to(torch.bfloat16)
    manual = loss_of(bf16(x.to(torch.bfloat16)), teacher, backend)
    assert abs(loss.item() - manual.item()) <= 1e-2 * manual.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    x, teacher = make_batch()
    module = make_module()
    (grad,) = torch.autograd.grad(loss_of(module(x), teacher, backend), module[0].weight, create_graph=True)
    if backend == "naive":  # the paper's formula through autograd has a second derivative
        grad.sum().backward()
        return
    with pytest.raises(RuntimeError, match="differentiable once"):
        grad.sum().backward()


def wrap(module, wrapper):
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(module)
    from torch.distributed.fsdp import fully_shard

    fully_shard(module[0])
    return fully_shard(module)


def full_gradients(module):
    return [getattr(p.grad, "full_tensor", lambda: p.grad)().cpu() for p in module.parameters()]


def data_parallel_worker(rank, world, scenarios):
    """Per scenario, this rank's gradients after one step: data parallel (a clip per rank) or the token axis of
    one clip split across the ranks (the module runs on this rank's tokens, the loss sees all of them)."""
    device = torch.device("cuda", rank) if DEVICE.type == "cuda" else DEVICE
    results = {}
    for wrapper, split, backend in scenarios:
        module = wrap(make_module(device=device), wrapper)
        x, teacher = make_batch(device=device)
        if split:
            # Each rank's backward gives its tokens' part of the gradient of the whole clips' loss; DDP and FSDP
            # average the ranks' gradients, so the loss is scaled by the group's size to sum them instead.
            rows = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)
            loss = world * loss_of(module(x[:, rows]), teacher[:, rows], backend, group=dist.group.WORLD)
        else:
            loss = loss_of(module(x[rank:rank + 1]), teacher[rank:rank + 1], backend)
        loss.backward()
        results[(wrapper, split, backend)] = full_gradients(module)
    return results


SCENARIOS = [("ddp", False, "two-pass"), ("ddp", False, "torch"), ("fsdp", False, "fused"),
             ("ddp", True, "two-pass"), ("fsdp", True, "torch"), ("ddp", True, "naive")]


@functools.lru_cache(maxsize=None)
def data_parallel_results():
    return run_processes(2, data_parallel_worker, SCENARIOS, device_type=DEVICE.type)


@pytest.mark.skipif(not TWO_PROCESSES_POSSIBLE, reason="needs two GPUs")
@pytest.mark.parametrize("scenario", SCENARIOS, ids=["-".join(map(str, s)).replace("False", "clip-per-rank")
                                                     .replace("True", "split-tokens") for s in SCENARIOS])
def test_data_parallel_matches_plain_step(scenario):
    x, teacher = make_batch()
    # The plain step over both clips: the mean over both clips' pairs is the mean of the two clips' losses.
    expected = plain_step(scenario[2], x, teacher)
    for rank in data_parallel_results():
        assert_same(rank[scenario], [g.cpu() for g in expected])


def test_readme_trainer_example_runs_on_two_processes(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "README.md")) as f:
        readme = f.read()
    block = readme[readme.index("<!-- trainer-example -->"):]
    script = tmp_path / "trd_step.py"
    script.write_text(block[block.index("```python\n") + 10:block.index("\n```\n")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = re.findall(r"step (\d): diffusion (\S+)  trd (\S+)", done.stdout)
    assert [int(step) for step, _, _ in steps] == [0, 1, 2]
    assert float(steps[-1][2]) < float(steps[0][2])  # the TRD term falls
