"""An exact physics metric for the tiny world: find each ball by its colour, track it, and score the laws the
renderer (videorepa/synthetic.py) uses.

Each ball is the set of pixels nearest in chromaticity to one palette colour (the balls are saturated, sky and floor
are grey-brown), so shading does not matter; its centre is the centroid of those pixels, its size their count. The
laws, each scored in [0, 1] (1 = as the renderer):

- gravity: between contacts, a ball accelerates by exactly g downwards and not at all sideways;
- bounce: a bounce off the floor loses energy (restitution < 1): the ball's energy after it is below its energy
  before;
- friction: a ball rolling on the floor slows down, never speeds up, and by no more than friction can;
- collision: when two balls meet, their summed horizontal momentum is kept (equal masses) and they separate
  instead of passing through each other;
- energy: no ball gains energy from nowhere (the summed energy of the balls never rises);
- persistence: every ball is there in every frame, with a constant size (objects neither appear nor vanish).

Accelerations are second differences of positions over three frames; a triple of frames counts as free flight only
if no contact could have happened inside it (a ball whose distance to the floor, a wall or another ball is within
what it travels in a frame may have touched it between frames). Energies (g·height + ½·speed²) come from one-frame
intervals; for a parabola the interval's mean velocity and mid-height make this exact up to a constant. A video's
score is the mean of the laws that apply to it (a clip without a collision is not scored on collisions), and a
video in which no ball is found scores 0.
"""

from dataclasses import dataclass, field

import numpy as np

from .synthetic import COLORS, FLOOR, GRAVITY

LAWS = ("gravity", "bounce", "friction", "collision", "energy", "persistence")
MIN_AREA = 32  # pixels: fewer of one colour is noise (where two balls' rims blend), not a ball (>= 250 pixels)
SATURATION = 0.35  # (max - min) / max of a pixel; sky and floor are below 0.25
CHROMA_DISTANCE = 0.12  # farthest chromaticity from a palette colour that still counts as that colour


@dataclass
class Track:
    color: str
    present: np.ndarray  # (F,) bool
    x: np.ndarray  # (F,) centroid, pixels (NaN where absent)
    y: np.ndarray
    area: np.ndarray  # (F,) pixel count

    @property
    def radius(self) -> np.ndarray:
        return np.sqrt(self.area / np.pi)


@dataclass
class WorldGeometry:
    """Where the floor and walls are and how strong gravity is, in pixels and frames."""

    height: int
    width: int
    fps: float

    @property
    def floor(self) -> float:
        return FLOOR * self.height

    @property
    def gravity(self) -> float:  # pixels / frame²
        return GRAVITY * self.height / 96 / self.fps ** 2

    @property
    def max_speed(self) -> float:  # pixels / frame: a fall from the top of the frame; nothing in the world is faster
        return float(np.sqrt(2 * self.gravity * self.height))

    @property
    def energy_scale(self) -> float:  # energy per unit mass of a ball lifted from the floor to the top
        return self.gravity * self.floor


@dataclass
class VideoScore:
    score: float
    laws: dict = field(default_factory=dict)  # law -> score, for the laws that apply
    balls: list = field(default_factory=list)  # colours found


def _chromaticity(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32)
    return rgb / np.maximum(rgb.sum(-1, keepdims=True), 1.0)


PALETTE = list(COLORS)
_PALETTE_CHROMA = _chromaticity(np.array([COLORS[c] for c in PALETTE]))


def segment(frames: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) -> int (F, H, W): index into PALETTE of each ball pixel, -1 elsewhere."""
    rgb = frames.astype(np.float32)
    top, bottom = rgb.max(-1), rgb.min(-1)
    saturated = (top - bottom) > SATURATION * np.maximum(top, 1.0)
    dist = np.linalg.norm(_chromaticity(frames)[..., None, :] - _PALETTE_CHROMA, axis=-1)  # (F, H, W, colours)
    nearest = dist.argmin(-1)
    ok = saturated & (np.take_along_axis(dist, nearest[..., None], -1)[..., 0] < CHROMA_DISTANCE)
    return np.where(ok, nearest, -1)


def track_balls(frames: np.ndarray) -> list[Track]:
    """One track per palette colour seen in at least one frame with MIN_AREA pixels."""
    labels = segment(frames)
    yy, xx = np.mgrid[0:frames.shape[1], 0:frames.shape[2]]
    tracks = []
    for index, color in enumerate(PALETTE):
        mask = labels == index
        area = mask.sum((1, 2)).astype(np.float64)
        present = area >= MIN_AREA
        if not present.any():
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.where(present, (mask * xx).sum((1, 2)) / area, np.nan)
            y = np.where(present, (mask * yy).sum((1, 2)) / area, np.nan)
        tracks.append(Track(color, present, x, y, area))
    return tracks


# ------------------------------------------------------------------------------------------------ contacts


def _contacts(tracks: list[Track], geo: WorldGeometry, tol: float = 1.5):
    """Per track, (F,) bool arrays: the ball may touch the floor / a wall / another ball around this frame (within
    what it travels to or from the neighbouring frames, plus `tol` pixels)."""
    out = []
    for i, tr in enumerate(tracks):
        r = tr.radius
        step = np.zeros_like(tr.x)
        dx, dy = np.abs(np.diff(tr.x)), np.abs(np.diff(tr.y))
        travel = np.minimum(np.nan_to_num(np.hypot(dx, dy), nan=0.0), geo.max_speed)  # a jump is no excuse
        step[:-1], step[1:] = travel, np.maximum(step[1:], travel)
        floor = (geo.floor - (tr.y + r)) <= step + tol
        wall = np.minimum(tr.x - r, geo.width - (tr.x + r)) <= step + tol
        ball = np.zeros_like(floor)
        for j, other in enumerate(tracks):
            if j != i:
                gap = np.hypot(tr.x - other.x, tr.y - other.y) - r - other.radius
                ball |= np.nan_to_num(gap, nan=np.inf) <= 2 * step + tol
        on_floor = np.abs(geo.floor - (tr.y + r)) <= tol + 0.5
        out.append({"floor": floor, "wall": wall, "ball": ball, "on_floor": on_floor})
    return out


def _triples(tr: Track):
    """Indices t with frames t-1, t, t+1 all present, and the accelerations there (pixels / frame²)."""
    t = np.flatnonzero(tr.present[:-2] & tr.present[1:-1] & tr.present[2:]) + 1
    ax = tr.x[t + 1] - 2 * tr.x[t] + tr.x[t - 1]
    ay = tr.y[t + 1] - 2 * tr.y[t] + tr.y[t - 1]
    return t, ax, ay


def _window(flags: np.ndarray, t: np.ndarray) -> np.ndarray:
    return flags[t - 1] | flags[t] | flags[t + 1]


# ------------------------------------------------------------------------------------------------ laws


def gravity_score(tracks, contacts, geo, tol=0.6):
    """Free-flight triples: acceleration (0, g) within `tol` pixels/frame² (centroid noise)."""
    errors = []
    for tr, c in zip(tracks, contacts):
        t, ax, ay = _triples(tr)
        free = ~_window(c["floor"] | c["wall"] | c["ball"], t)
        errors += list(np.maximum(0.0, np.hypot(ax[free], ay[free] - geo.gravity) - tol))
    return None if not errors else float(np.exp(-np.mean(errors) / geo.gravity))


def friction_score(tracks, contacts, geo, tol=0.4):
    """Rolling triples (on the floor in all three frames, away from walls and balls): the horizontal acceleration
    opposes the motion (friction slows) and is at most what friction gives (a tenth of the speed per frame), and the
    floor holds the ball (no vertical acceleration). Violations in units of g/4, a rolling ball's scale."""
    errors = []
    for tr, c in zip(tracks, contacts):
        t, ax, ay = _triples(tr)
        rolling = c["on_floor"][t - 1] & c["on_floor"][t] & c["on_floor"][t + 1] & ~_window(c["wall"] | c["ball"], t)
        t, ax, ay = t[rolling], ax[rolling], ay[rolling]
        v = (tr.x[t + 1] - tr.x[t - 1]) / 2
        speeds_up = np.maximum(0.0, ax * np.sign(v))
        too_strong = np.maximum(0.0, np.abs(ax) - 0.1 * np.abs(v))
        errors += list(np.maximum(0.0, speeds_up + too_strong + np.abs(ay) - tol))
    return None if not errors else float(np.exp(-np.mean(errors) / (geo.gravity / 4)))


def _interval_energy(tr: Track, geo: WorldGeometry) -> np.ndarray:
    """(F-1,) energy per unit mass over each one-frame interval: g·(height above the floor) + ½·speed²."""
    vx, vy = np.diff(tr.x), np.diff(tr.y)
    mid_y = (tr.y[1:] + tr.y[:-1]) / 2
    bottom = mid_y + (tr.radius[1:] + tr.radius[:-1]) / 2
    return geo.gravity * (geo.floor - bottom) + 0.5 * (vx ** 2 + vy ** 2)


def bounce_score(tracks, contacts, geo, tol=0.1):
    """Each bounce (vertical motion turning from down to up near the floor, away from walls and other balls): the
    energy of the last clean interval after it, relative to the last clean one before it, must not exceed 1
    (+ `tol`). Score per bounce exp(-excess / 0.5); the mean over bounces."""
    scores = []
    for tr, c in zip(tracks, contacts):
        energy = _interval_energy(tr, geo)
        vy = np.diff(tr.y)
        near = c["floor"][:-1] | c["floor"][1:]
        clean = ~(near | c["wall"][:-1] | c["wall"][1:] | c["ball"][:-1] | c["ball"][1:]) & np.isfinite(energy)
        for k in range(1, len(vy) - 1):
            if not (near[k] and vy[k - 1] > 0 and vy[k + 1] < 0 and np.isfinite(vy[k - 1:k + 2]).all()):
                continue
            if c["wall"][k - 1:k + 3].any() or c["ball"][k - 1:k + 3].any():
                continue
            before = [j for j in range(k) if clean[j]]
            after = [j for j in range(k + 1, len(vy)) if clean[j]]
            if not before or not after or energy[before[-1]] <= 0:
                continue
            ratio = energy[after[0]] / energy[before[-1]]
            scores.append(float(np.exp(-max(0.0, ratio - 1 - tol) / 0.5)))
    return None if not scores else float(np.mean(scores))


def collision_score(tracks, contacts, geo, tol=0.15):
    """Each meeting of two balls: summed horizontal velocity kept across it (relative error beyond `tol`, in units
    of the balls' speeds) and the balls separate afterwards (their gap grows) instead of passing through."""
    scores = []
    for i in range(len(tracks)):
        for j in range(i + 1, len(tracks)):
            a, b = tracks[i], tracks[j]
            gap = np.hypot(a.x - b.x, a.y - b.y) - a.radius - b.radius
            touching = np.nan_to_num(gap, nan=np.inf) <= 1.5 + np.nan_to_num(
                np.abs(np.gradient(np.nan_to_num(a.x - b.x))), nan=0.0)
            for first, last in _runs(touching):
                before, after = first - 1, last + 1  # intervals (before-1, before) and (after, after+1)
                if before >= 1 and after + 1 < len(a.x):
                    scores += _collision(a, b, before, after, tol)
    return None if not scores else float(np.mean(scores))


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of True."""
    edges = np.diff(np.concatenate([[0], flags.astype(int), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def _collision(a: Track, b: Track, before: int, after: int, tol: float) -> list[float]:
    va = np.array([a.x[before] - a.x[before - 1], a.x[after + 1] - a.x[after]])
    vb = np.array([b.x[before] - b.x[before - 1], b.x[after + 1] - b.x[after]])
    if not (np.isfinite(va).all() and np.isfinite(vb).all()):
        return []
    scale = max(abs(va[0]) + abs(vb[0]), 1e-6)
    momentum = float(np.exp(-max(0.0, abs((va[1] + vb[1]) - (va[0] + vb[0])) / scale - tol) / 0.5))
    separate = float(np.sign(a.x[after] - b.x[after]) == np.sign(a.x[before] - b.x[before]))
    return [0.5 * (momentum + separate)]


def energy_score(tracks, geo, tol=0.02):
    """No energy from nowhere: the balls' summed energy over an interval never exceeds its highest value over the
    earlier intervals by more than `tol` × energy_scale (bounces and friction lose energy, collisions of equal
    masses pass it on). Measuring over an interval that holds a bounce or a collision can only underestimate the
    energy, so comparing with the running maximum needs no contact detection. Excess in units of energy_scale."""
    energies = np.stack([_interval_energy(tr, geo) for tr in tracks]).sum(0)  # NaN where a ball is missing
    finite = energies[np.isfinite(energies)]
    if len(finite) < 2:
        return None
    excess = np.maximum(0.0, finite[1:] - np.maximum.accumulate(finite)[:-1] - tol * geo.energy_scale)
    return float(np.exp(-excess.sum() / geo.energy_scale))


def persistence_score(tracks, num_frames: int, tol=0.05):
    """Per ball: the fraction of frames it is in, times exp(-2 × relative spread of its size beyond `tol`); the mean
    over balls."""
    scores = []
    for tr in tracks:
        area = tr.area[tr.present]
        spread = np.std(area) / max(np.mean(area), 1.0)
        scores.append(tr.present.sum() / num_frames * float(np.exp(-2 * max(0.0, spread - tol))))
    return float(np.mean(scores))


def score_video(frames: np.ndarray, fps: float, tracks: list[Track] | None = None) -> VideoScore:
    """The physics score of uint8 frames (F, H, W, 3) of the tiny world at `fps` frames per second."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    geo = WorldGeometry(frames.shape[1], frames.shape[2], fps)
    tracks = track_balls(frames) if tracks is None else tracks
    if not tracks:
        return VideoScore(0.0, {}, [])
    contacts = _contacts(tracks, geo)
    laws = {
        "gravity": gravity_score(tracks, contacts, geo),
        "bounce": bounce_score(tracks, contacts, geo),
        "friction": friction_score(tracks, contacts, geo),
        "collision": collision_score(tracks, contacts, geo),
        "energy": energy_score(tracks, geo),
        "persistence": persistence_score(tracks, len(frames)),
    }
    laws = {k: v for k, v in laws.items() if v is not None}
    return VideoScore(float(np.mean(list(laws.values()))), laws, [t.color for t in tracks])
