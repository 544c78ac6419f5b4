"""Procedural physics clips for the embedded default: balls falling, bouncing, colliding and rolling.

Each clip is simulated with simple Newtonian rules (gravity, restitution at the floor and walls, elastic
collisions, rolling friction), rendered with anti-aliased disks, and written as mp4 with a caption that says what
happens. Deterministic per seed. The clips go to disk as mp4 + CSV and are read back through the loader that real
data uses.
"""

import csv
import os
from dataclasses import dataclass

import numpy as np

from .files import atomic_path
from .video_io import write_video

COLORS = {"red": (220, 50, 40), "blue": (40, 90, 220), "green": (40, 170, 70), "yellow": (230, 200, 40),
          "purple": (140, 60, 190), "orange": (240, 130, 30)}
SCENES = ("falling", "bouncing", "colliding", "rolling")
GRAVITY = 900.0  # pixels / s² at the rendered scale
FLOOR = 0.85  # floor height as a fraction of the frame
# What each scene's caption says, the balls' colours filled in ({1}: the second ball of a collision, on the right).
CAPTIONS = {
    "falling": "A {0} ball is dropped from rest, falls faster and faster under gravity and bounces on the floor.",
    "bouncing": "A {0} ball is thrown sideways and bounces along the floor, each bounce lower than the last.",
    "colliding": "A {0} ball and a {1} ball roll toward each other, collide and bounce apart.",
    "rolling": "A {0} ball rolls along the floor and slows down because of friction.",
}


@dataclass
class Ball:
    x: float
    y: float
    vx: float
    vy: float
    radius: float
    color: str


def _step(balls, dt, height, width, gravity, restitution, friction):
    floor = FLOOR * height
    for b in balls:
        b.vy += gravity * dt
        b.x += b.vx * dt
        b.y += b.vy * dt
        if b.y + b.radius > floor:  # bounce off the floor, losing energy; slow impacts come to rest
            b.y = floor - b.radius
            b.vy = -b.vy * restitution if abs(b.vy) > 30 * height / 96 else 0.0
            b.vx *= 1.0 - friction
        for wall, sign in ((b.radius, 1), (width - b.radius, -1)):
            if sign * (b.x - wall) < 0:
                b.x, b.vx = wall, -b.vx * restitution
    for i in range(len(balls)):  # equal-mass elastic collisions: exchange the velocity along the contact normal
        for j in range(i + 1, len(balls)):
            a, c = balls[i], balls[j]
            d = np.array([c.x - a.x, c.y - a.y])
            dist = float(np.linalg.norm(d))
            if 0 < dist < a.radius + c.radius:
                n = d / dist
                rel = (a.vx - c.vx) * n[0] + (a.vy - c.vy) * n[1]
                if rel > 0:
                    a.vx, a.vy = a.vx - rel * n[0], a.vy - rel * n[1]
                    c.vx, c.vy = c.vx + rel * n[0], c.vy + rel * n[1]


def falling_caption(color: str) -> str:
    """The caption of a falling clip; in this wording it is also the samplers' default prompt, which the tiny
    model follows best in the captions' own words."""
    return CAPTIONS["falling"].format(color)


def caption_texts() -> list[str]:
    """Every caption the renderer writes (each scene with every pair of colours): the tiny world's language."""
    return [CAPTIONS[scene].format(a, b) for scene in SCENES for a in COLORS for b in COLORS if a != b]


def background(height: int, width: int) -> np.ndarray:
    """The empty scene (sky and floor), uint8 (H, W, 3)."""
    return _render([], height, width)


def _render(balls, height, width):
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.linspace(235, 180, height, dtype=np.float32)[:, None, None] * np.ones((1, width, 3), np.float32)
    frame = sky * np.array([0.85, 0.92, 1.0], np.float32)
    frame[int(FLOOR * height):] = (110, 95, 80)
    for b in balls:
        coverage = np.clip(b.radius + 0.5 - np.hypot(xx - b.x, yy - b.y), 0.0, 1.0)[..., None]
        shade = 1.0 - 0.35 * np.clip((yy - b.y + xx - b.x) / (2 * b.radius), 0, 1)[..., None]  # lit from top-left
        frame = frame * (1 - coverage) + coverage * np.array(COLORS[b.color], np.float32) * shade
    return np.clip(frame, 0, 255).astype(np.uint8)


def make_clip(seed: int, num_frames: int = 17, height: int = 96, width: int = 128, fps: int = 8):
    """(frames uint8 (F, H, W, 3), caption) for one deterministic scene. Lengths, speeds and gravity scale with
    the frame height (the scene is laid out for a height of 96 pixels), so a smaller render shows the same motion;
    a higher `fps` samples the same motion more finely."""
    rng = np.random.default_rng(seed)
    scene = SCENES[seed % len(SCENES)]
    colors = rng.choice(list(COLORS), size=2, replace=False)
    # Balls 18-23 pixels wide at the tiny world's 64×96: 2-3 of its transformer's 8-pixel tokens. At 12-17 pixels a
    # ball straddled 1-2 tokens, and the tiny model drew it as scattered token-sized squares.
    r = float(rng.uniform(0.14, 0.18) * height)
    floor = FLOOR * height
    scale = height / 96
    gravity, restitution, friction = GRAVITY * scale, 0.7, 0.02
    if scene == "falling":
        balls = [Ball(rng.uniform(0.3, 0.7) * width, r + 2, 0.0, 0.0, r, colors[0])]
    elif scene == "bouncing":
        # Thrown from a quarter of the way across, slowly enough that its bounces land on the floor, away from the
        # far wall, and low enough that the whole ball stays in frame at the throw's highest point.
        side = float(rng.choice([-1, 1]))
        vx, vy = side * float(rng.uniform(30, 60)) * scale, -200.0 * scale
        apex = r + 2 + rng.uniform(0.0, 0.1) * height
        balls = [Ball(width / 2 - side * width / 4, apex + vy ** 2 / (2 * gravity), vx, vy, r, colors[0])]
    elif scene == "colliding":
        y = floor - r
        balls = [Ball(r + 4, y, rng.uniform(120, 180) * scale, 0.0, r, colors[0]),
                 Ball(width - r - 4, y, -rng.uniform(120, 180) * scale, 0.0, r, colors[1])]
    else:
        balls = [Ball(r + 4, floor - r, rng.uniform(150, 250) * scale, 0.0, r, colors[0])]
        friction = 0.08
    substeps = 8
    frames = []
    for _ in range(num_frames):
        frames.append(_render(balls, height, width))
        for _ in range(substeps):
            _step(balls, 1.0 / (fps * substeps), height, width, gravity, restitution, friction / substeps)
    return np.stack(frames), CAPTIONS[scene].format(*colors)


def write_dataset(folder: str, num_clips: int = 16, seed: int = 0, **clip_args) -> str:
    """Write `num_clips` mp4 clips and `captions.csv` (columns video,caption; paths relative to the CSV)."""
    os.makedirs(os.path.join(folder, "videos"), exist_ok=True)
    csv_path = os.path.join(folder, "captions.csv")
    rows = []
    for i in range(num_clips):
        frames, caption = make_clip(seed + i, **clip_args)
        name = os.path.join("videos", f"clip_{seed + i:05d}.mp4")
        write_video(os.path.join(folder, name), frames, fps=clip_args.get("fps", 8))
        rows.append({"video": name, "caption": caption})
    with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["video", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    return csv_path
