"""Precomputed training inputs: VAE latent distributions, T5 embeddings and teacher tokens, computed once per clip
and reused across runs. Entries are keyed by the file (path, size, mtime) and by everything that shapes them, so
a changed clip or config never reads a stale entry; a clip that cannot be used is recorded too, with the reason.
"""

import hashlib
import json
import os

import torch

from .files import atomic_path

# What an entry holds beyond its config: bump when the computation changes, so old entries are never read.
# 2: teacher frames resized bicubic without antialias, V-JEPA 2 before its final norm, VideoMAEv2 LayerNorm eps 1e-6.
# 3: frames picked, cropped and resized as the official loader (videorepa.data.sample_frames).
FORMAT = 3


class FeatureCache:
    def __init__(self, folder: str, config: dict):
        self.folder = folder
        self.config = config
        os.makedirs(folder, exist_ok=True)

    def key(self, video_path: str, caption: str) -> str:
        stat = os.stat(video_path) if os.path.exists(video_path) else None
        identity = {"format": FORMAT, "path": os.path.abspath(video_path), "caption": caption, "config": self.config,
                    "file": [stat.st_size, stat.st_mtime_ns] if stat else None}
        return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str, ext: str) -> str:
        return os.path.join(self.folder, key[:2], f"{key}.{ext}")

    def load(self, key: str) -> dict | None:
        """The cached tensors, {"error": reason} for a clip known to be unusable, or None if not computed yet."""
        tensors, error = self._path(key, "pt"), self._path(key, "error")
        if os.path.exists(tensors):
            return torch.load(tensors, map_location="cpu", weights_only=True)
        if os.path.exists(error):
            with open(error, encoding="utf-8") as f:
                return {"error": f.read()}
        return None

    def _new_entry(self, key: str, ext: str):
        path = self._path(key, ext)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return atomic_path(path)  # a reader sees all of an entry or none of it

    def store(self, key: str, tensors: dict) -> None:
        with self._new_entry(key, "pt") as tmp:
            torch.save({k: v.cpu().contiguous() for k, v in tensors.items()}, tmp)

    def store_error(self, key: str, reason: str) -> None:
        with self._new_entry(key, "error") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(reason)


class CachedDataset(torch.utils.data.Dataset):
    """Dataset items read from the cache only: {index, latent_dist, prompt_embeds, teacher} or {index, error}."""

    def __init__(self, cache: FeatureCache, rows: list[tuple[str, str]]):
        self.cache, self.keys = cache, [cache.key(path, caption) for path, caption in rows]
        self.paths = [path for path, _ in rows]

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        entry = self.cache.load(self.keys[index])
        if entry is None:
            return {"index": index, "error": f"{self.paths[index]}: missing from the feature cache"}
        if "error" in entry:
            return {"index": index, "error": entry["error"]}
        return {"index": index, **entry}
