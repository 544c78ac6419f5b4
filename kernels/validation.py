"""Argument checks shared by every TRD backend: bad input fails here, with the argument named, never deep in a kernel."""

from dataclasses import dataclass
from typing import Optional

import torch

MODES = ("full", "spatial", "temporal")
BACKENDS = ("auto", "triton", "torch", "naive")
SCHEDULES = ("auto", "two-pass", "fused")


@dataclass(frozen=True)
class TRDProblem:
    """Validated inputs as (B, N, D) views plus everything the backends derive from the arguments."""

    student: torch.Tensor
    teacher: torch.Tensor
    margin: float
    mode: str
    tokens_per_frame: int  # N for mode "full": one frame holding every token
    num_pairs: int  # pairs the mode keeps, summed over the batch: the mean's denominator
    # The token rows [start, end) this process computes against every column, when the tokens are split across
    # processes (sequence parallelism). None: all rows, and the engines may use the Gram matrices' symmetry.
    rows: Optional[tuple[int, int]] = None

    @property
    def batch(self) -> int:
        return self.student.shape[0]

    @property
    def tokens(self) -> int:
        return self.student.shape[1]

    @property
    def row_range(self) -> tuple[int, int]:
        return self.rows if self.rows is not None else (0, self.tokens)

    def kept_pairs(self, rows: slice, cols: slice) -> Optional[torch.Tensor]:
        """Which pairs of token rows × columns the mode keeps, (rows, cols) bool; None in mode "full" (all)."""
        if self.mode == "full":
            return None
        frame = torch.arange(self.tokens, device=self.student.device) // self.tokens_per_frame
        same = frame[rows, None] == frame[None, cols]
        return same if self.mode == "spatial" else ~same


def count_pairs(tokens: int, tokens_per_frame: int, mode: str) -> int:
    """Token pairs (i, j), i == j included, that `mode` keeps in one clip."""
    same_frame = (tokens // tokens_per_frame) * tokens_per_frame**2
    return {"full": tokens**2, "spatial": same_frame, "temporal": tokens**2 - same_frame}[mode]


def _check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16), got {x.dtype}")
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be (N, D) or (B, N, D), got shape {tuple(x.shape)}")
    return x if x.dim() == 3 else x.unsqueeze(0)


def check_shard(student, teacher, margin, mode, tokens_per_frame) -> tuple[torch.Tensor, torch.Tensor]:
    """The checks that one process's share of the tokens passes or fails on its own: (B, N, D) views of both
    inputs. N may be 0 here; what depends on N (frames dividing it) is checked on the whole token axis."""
    s = _check_tensor("student", student)
    t = _check_tensor("teacher", teacher)
    if student.dim() != teacher.dim():
        raise ValueError(
            f"student and teacher must both be 2-D or both 3-D, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            "student and teacher must agree in batch size and token count (B, N), got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if s.device != t.device:
        raise ValueError(f"student is on {s.device} but teacher is on {t.device}")
    if s.shape[0] == 0:
        raise ValueError(f"student and teacher need at least one clip and one token, got shape {tuple(student.shape)}")
    if s.shape[2] == 0 or t.shape[2] == 0:
        raise ValueError(f"feature width must be at least 1, got student {tuple(s.shape)} and teacher {tuple(t.shape)}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise TypeError(f"margin must be a number, got {type(margin).__name__}")
    if not margin >= 0:  # also rejects NaN
        raise ValueError(f"margin must be >= 0, got {margin}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "full":
        if tokens_per_frame is None:
            raise ValueError(f"mode {mode!r} needs tokens_per_frame (tokens in one frame)")
        if isinstance(tokens_per_frame, bool) or not isinstance(tokens_per_frame, int):
            raise TypeError(f"tokens_per_frame must be an int, got {type(tokens_per_frame).__name__}")
        if tokens_per_frame <= 0:
            raise ValueError(f"tokens_per_frame={tokens_per_frame} must be positive")
    return s, t


def validate(student, teacher, margin, mode, tokens_per_frame, rows: Optional[tuple[int, int]] = None) -> TRDProblem:
    """Checks the arguments on the whole token axis; `rows` marks the share of the rows this process computes."""
    s, t = check_shard(student, teacher, margin, mode, tokens_per_frame)
    batch, tokens = s.shape[:2]
    if tokens == 0:
        raise ValueError(f"student and teacher need at least one clip and one token, got shape {tuple(student.shape)}")
    if mode == "full":
        tokens_per_frame = tokens
    else:
        if tokens % tokens_per_frame:
            raise ValueError(f"tokens_per_frame={tokens_per_frame} must divide N={tokens}")
        if mode == "temporal" and tokens_per_frame == tokens:
            raise ValueError(f"mode 'temporal' needs at least two frames, but tokens_per_frame equals N={tokens}")
    pairs = batch * count_pairs(tokens, tokens_per_frame, mode)
    return TRDProblem(s, t, float(margin), mode, tokens_per_frame, pairs, rows)
