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


def frame_indices(total: int, num_frames: int) -> list[int]:
    """Which of a clip's `total` frames to keep, as the official loader picks them: every ⌊total/num_frames⌋-th
    frame from frame 0, the first `num_frames` of those; a shorter clip keeps all its frames and repeats its last.
    official: finetune/datasets/utils.py, preprocess_video_with_resize_with_frame_idxs (start 0, end = frame count)
    """
    if total < 1 or num_frames < 1:
        raise ValueError(f"need at least one frame to sample from and to, got total={total}, num_frames={num_frames}")
    if total < num_frames:
        return list(range(total)) + [total - 1] * (num_frames - total)
    return list(range(0, total, total // num_frames))[:num_frames]


def center_crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of the largest center crop of an h×w frame with the aspect ratio of
    height×width, with the official rounding (sizes truncated, offsets rounded half to even).
    official: finetune/datasets/data_transform.py, center_crop_th_tw (top_crop=False)
    """
    ratio = height / width
    crop_h, crop_w = (int(w * ratio), w) if h / w > ratio else (h, int(h / ratio))
    return int(round((h - crop_h) / 2.0)), int(round((w - crop_w) / 2.0)), crop_h, crop_w


def sample_frames(frames: np.ndarray, num_frames: int, height: int, width: int) -> torch.Tensor:
    """uint8 (F, H, W, 3) -> float (num_frames, 3, height, width) in [-1, 1], as the official loader: frames picked
    by `frame_indices`, center crop to the target aspect ratio, then bilinear resize (align_corners=True, antialias).
    official: finetune/datasets/t2v_dataset.py, T2VDatasetWithResize (CenterCropResizeVideo, then x / 255 * 2 - 1)
    """
    video = torch.from_numpy(frames[frame_indices(len(frames), num_frames)]).permute(0, 3, 1, 2).float()
    top, left, crop_h, crop_w = center_crop_box(*video.shape[-2:], height, width)
    video = video[:, :, top:top + crop_h, left:left + crop_w]
    video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=True, antialias=True)
    return video / 255.0 * 2.0 - 1.0


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
