"""Video–caption data: a CSV (columns video,caption; paths relative to the CSV, as OpenVid's layout) of clips that
are decoded, frame-sampled and resized; a deterministic, resumable order of batches; bad clips skipped and counted.
"""

import csv
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from .video_io import VideoReadError, read_video


def read_captions(csv_path: str) -> list[tuple[str, str]]:
    """(absolute video path, caption) rows of a CSV with at least the columns video and caption."""
    if not os.path.isfile(csv_path):
        raise ValueError(f"--data {csv_path!r}: no such file")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"video", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"--data {csv_path!r} lacks the column(s) {sorted(missing)}; found {reader.fieldnames}")
        root = os.path.dirname(os.path.abspath(csv_path))
        rows = [(os.path.join(root, row["video"]), row["caption"] or "") for row in reader if row["video"]]
    if not rows:
        raise ValueError(f"--data {csv_path!r} has no rows")
    return rows


def sample_frames(frames: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (num_frames, 3, height, width) in [-1, 1]: evenly spaced frames, center crop to
    the target aspect ratio, bilinear resize."""
    if len(frames) < num_frames:
        raise VideoReadError(f"has {len(frames)} frames, fewer than the {num_frames} needed")
    index = np.linspace(0, len(frames) - 1, num_frames).round().astype(int)
    video = torch.from_numpy(frames[index]).permute(0, 3, 1, 2).float()
    h, w = video.shape[-2:]
    crop_h, crop_w = min(h, round(w * height / width)), min(w, round(h * width / height))
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    video = video[:, :, top:top + crop_h, left:left + crop_w]
    video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return (video / 127.5 - 1.0).clamp_(-1.0, 1.0)


class VideoCaptionDataset(torch.utils.data.Dataset):
    """Items are dicts {index, video (F, 3, H, W) in [-1, 1], caption}; a clip that cannot be used gives
    {index, error} instead, so the training loop can skip it, say why, and count it."""

    def __init__(self, csv_path: str, num_frames: int, height: int, width: int):
        self.rows = read_captions(csv_path)
        self.num_frames, self.height, self.width = num_frames, height, width

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        path, caption = self.rows[index]
        try:
            if not os.path.isfile(path):
                raise VideoReadError("file not found")
            video = sample_frames(read_video(path), self.num_frames, self.height, self.width)
        except VideoReadError as err:
            return {"index": index, "error": f"{path}: {err}"}
        return {"index": index, "video": video, "caption": caption}


class BatchOrder:
    """Deterministic batches of dataset indices: a fresh permutation per epoch seeded by (seed, epoch), cut into
    global batches of which each rank takes every world-th index. As DistributedSampler, the permutation is padded
    by repeating its start to a multiple of the world size, so every rank gets the same number of non-empty batches
    each epoch. `position` is (epoch, cursor) and restores the exact order on resume."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.position = (0, 0)

    @property
    def batches_per_epoch(self) -> int:
        """Batches each rank takes per epoch: ceil(ceil(size / world) / batch size)."""
        return math.ceil(math.ceil(self.size / self.world) / self.batch_size)

    def _permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        padding = -len(order) % self.world
        return order + (order * math.ceil(padding / len(order)))[:padding]

    def __iter__(self):
        epoch, cursor = self.position
        step = self.batch_size * self.world
        while True:
            order = self._permutation(epoch)
            while cursor < len(order):
                chunk = order[cursor:cursor + step]
                cursor += step
                # Each item carries the position after its batch, so the trainer records what it consumed
                # (DataLoader workers prefetch ahead of that).
                yield [(i, epoch, cursor) for i in chunk[self.rank::self.world]]
            epoch, cursor = epoch + 1, 0


class PositionedDataset(torch.utils.data.Dataset):
    """Adapts a dataset to BatchOrder's (index, epoch, cursor) items, passing the position through."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, epoch, cursor = item
        return {**self.dataset[index], "position": (epoch, cursor)}


def collate(items: list[dict]) -> dict:
    """Stacks the usable items; unusable ones are listed under "errors" with their index."""
    good = [it for it in items if "error" not in it]
    batch = {
        "errors": [(it["index"], it["error"]) for it in items if "error" in it],
        "position": max(it["position"] for it in items),
        "index": [it["index"] for it in good],
    }
    for key in good[0].keys() - {"index", "position"} if good else ():
        values = [it[key] for it in good]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch
