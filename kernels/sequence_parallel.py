"""The TRD loss of clips whose tokens are split across the processes of a group (sequence or context parallelism).

Each process holds a contiguous slice of the token axis, in rank order, of any size. The relations are global, so
every process needs every token, but only as data: the processes exchange their shapes (a few integers each),
all-gather the tokens without autograd (O(N·D)), compute their own rows against all columns, and sum the per-clip
loss sums (B numbers). The result is the exact loss of the whole clips on every process, and each process gets
the exact gradient of its own slice. Frames are counted on the whole token axis, so they may straddle slices.

Every process makes the same collective calls in the same order whatever its inputs: a process whose inputs are
bad, or that disagrees with the others (widths, batch, dtypes, mode, margin), makes every process raise instead of
leaving the others waiting.
"""

import struct

import torch
import torch.distributed as dist

from .fused import engine_for, loss_and_gradient
from .naive import naive_shard_trd_loss
from .validation import MODES, TRDProblem, validate

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# One row per process: whether its own checks passed, then what every process must agree on, and its token count.
FIELDS = ("checks passed", "batch size B", "student feature width Ds", "teacher feature width Dt", "student dtype",
          "teacher dtype", "mode", "tokens_per_frame", "margin", "tokens")


def _comm_device(group, like) -> torch.device:
    """Where this group's collectives take tensors: the inputs' device, or for a process without usable inputs
    the current CUDA device under NCCL, else the CPU."""
    if isinstance(like, torch.Tensor):
        return like.device
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _exchange(row: list, group, device) -> torch.Tensor:
    """Every process's row of FIELDS, (world, fields), in rank order."""
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    rows = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, mine, group=group)
    return torch.stack(rows).cpu()


def announce_failure(group, like) -> None:
    """Joins the shape exchange with "checks failed", so that the other processes raise too; the caller then
    raises its own error."""
    _exchange([0] * len(FIELDS), group, _comm_device(group, like))


def _describe(field: str, value: int):
    if field.endswith("dtype"):
        return str(DTYPES[value]).replace("torch.", "")
    if field == "mode":
        return MODES[value]
    if field == "margin":
        return struct.unpack("<d", struct.pack("<q", value))[0]
    return None if field == "tokens_per_frame" and value < 0 else value


def _agree(table: torch.Tensor) -> list[int]:
    """Raises the same error on every process unless all passed their checks and agree; the token counts."""
    failed = [rank for rank, passed in enumerate(table[:, 0].tolist()) if not passed]
    if failed:
        raise ValueError(f"trd_loss(group=...): process(es) of rank {failed} rejected their inputs (their own error "
                         "says why), so every process stops here")
    for index, field in enumerate(FIELDS[1:-1], start=1):
        values = table[:, index].tolist()
        if len(set(values)) > 1:
            raise ValueError(f"trd_loss(group=...): every process's slice must have the same {field} (only the "
                             f"token count may differ), got {[_describe(field, v) for v in values]} in rank order")
    counts = table[:, -1].tolist()
    if not sum(counts):
        raise ValueError("trd_loss(group=...): the processes hold no tokens between them")
    return counts


def _gather_tokens(x: torch.Tensor, counts: list[int], group) -> torch.Tensor:
    """All processes' tokens, (B, Σ counts, D), without autograd. Slices are padded to the longest (collectives
    take equal sizes) and sent as bytes, which every backend carries whatever the dtype."""
    batch, tokens, width = x.shape
    padded = x.new_zeros((batch, max(counts), width))
    padded[:, :tokens] = x.detach()
    mine = padded.view(torch.uint8)
    parts = [torch.empty_like(mine) for _ in counts]
    dist.all_gather(parts, mine, group=group)
    return torch.cat([part[:, :count] for part, count in zip(parts, counts)], dim=1).view(x.dtype)


def gather_problem(student, teacher, margin: float, mode: str, tokens_per_frame, group) -> TRDProblem:
    """The whole token axis as data, with this process's rows marked; `student` and `teacher` are its (B, n, D)
    slices, already through `check_shard`."""
    mode_id = MODES.index(mode)
    margin_bits = struct.unpack("<q", struct.pack("<d", float(margin)))[0]
    row = [1, student.shape[0], student.shape[2], teacher.shape[2], DTYPES.index(student.dtype),
           DTYPES.index(teacher.dtype), mode_id, -1 if mode == "full" else tokens_per_frame, margin_bits,
           student.shape[1]]
    counts = _agree(_exchange(row, group, student.device))
    rank = dist.get_rank(group)
    start = sum(counts[:rank])
    whole_s, whole_t = _gather_tokens(student, counts, group), _gather_tokens(teacher, counts, group)
    # The whole axis's checks (frames dividing N) see the same shapes everywhere: all processes raise alike.
    return validate(whole_s, whole_t, margin, mode, tokens_per_frame, rows=(start, start + counts[rank]))


def _summed(group):
    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=group)
        return x

    return all_reduce


def sharded_loss_and_gradient(student, teacher, margin, mode, tokens_per_frame, backend, schedule, need_s, need_t,
                              group_name: str):
    """(loss, gradient of this process's student slice or None, the same for the teacher) for backends "torch" and
    "triton": the gradient is computed in forward, so backward needs no collective."""
    group = dist.distributed_c10d._resolve_process_group(group_name)
    problem = gather_problem(student, teacher, margin, mode, tokens_per_frame, group)
    engine = engine_for(problem, backend, schedule, need_s, need_t)
    return loss_and_gradient(problem, engine, need_s, need_t, all_reduce=_summed(group))


@torch.compiler.disable  # its collectives need sizes known only at run time: eager, a graph break under compile
def naive_sharded_trd_loss(student, teacher, margin, mode, tokens_per_frame, group) -> torch.Tensor:
    """The paper's formula under a group, through autograd."""
    problem = gather_problem(student, teacher, margin, mode, tokens_per_frame, group)
    return naive_shard_trd_loss(problem, student, teacher, _summed(group))
