"""Training checkpoints: `OUT/checkpoint-STEP/` folders written atomically, the newest K kept, resumable.

A checkpoint is first written to a hidden temporary folder and renamed into place, so a crash mid-write leaves the
previous checkpoints untouched and never a half checkpoint that resume would pick up.
"""

import os
import random
import re
import shutil

import numpy as np
import torch

from .files import atomic_folder

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := PATTERN.match(name))]
    return sorted(found)


def latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def save_checkpoint(output_dir: str, step: int, write, keep: int) -> str:
    """`write(folder)` fills a temporary folder that then becomes OUT/checkpoint-STEP; older ones beyond `keep` go."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    with atomic_folder(final) as tmp:
        write(tmp)
    for _, old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
