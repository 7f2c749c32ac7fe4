"""The built-in two-domain street scenes: procedural, deterministic by (seed, index), no download.

``day`` is bright, warm and sharp with large objects; ``dusk`` is dark, bluish, low-contrast and noisy,
with lit windows, headlights, smaller objects and coarser textures. Same five classes in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tmtseg.data.decode import Pair, Record

CLASS_NAMES = ["sky", "road", "building", "tree", "car"]
SKY, ROAD, BUILDING, TREE, CAR = range(5)
PALETTE = np.array([[70, 130, 180], [128, 64, 128], [70, 70, 70], [107, 142, 35], [0, 0, 142]], dtype=np.uint8)
HEIGHT, WIDTH = 128, 160  # small enough for a CPU step, wide like a dash camera
DOMAINS = ("day", "dusk")


@dataclass(frozen=True)
class Style:
    """What differs between the domains: scale, light, colour and texture statistics."""

    object_scale: tuple[float, float]
    sky_top: tuple[int, int, int]
    sky_horizon: tuple[int, int, int]
    brightness: float  # multiplies the reflected light
    tint: tuple[float, float, float]  # per-channel gain: warm sunlight or blue dusk
    contrast: float  # 1 = unchanged; lower pulls every pixel towards the mean
    noise: float  # sensor noise std in grey levels
    leaf_cell: int  # value-noise cell of the foliage (px): fine = sharp leaves
    window_period: tuple[int, int]  # window grid period range (px)
    lit_windows: float  # share of windows that emit light
    lights: bool  # car head/tail lights on


STYLES = {
    "day": Style(
        object_scale=(1.0, 1.3), sky_top=(95, 150, 225), sky_horizon=(205, 220, 238), brightness=1.05,
        tint=(1.06, 1.0, 0.88), contrast=1.0, noise=1.5, leaf_cell=2, window_period=(7, 10),
        lit_windows=0.0, lights=False,
    ),
    "dusk": Style(
        object_scale=(0.6, 0.85), sky_top=(30, 35, 85), sky_horizon=(170, 110, 100), brightness=0.6,
        tint=(0.78, 0.88, 1.22), contrast=0.65, noise=7.0, leaf_cell=5, window_period=(4, 6),
        lit_windows=0.35, lights=True,
    ),
}  # fmt: skip

BUILDING_COLOURS = np.array([[200, 180, 150], [170, 95, 75], [190, 160, 120], [150, 150, 160], [120, 110, 100]])
CAR_COLOURS = np.array([[180, 30, 30], [30, 60, 160], [225, 225, 225], [35, 35, 40], [160, 165, 170], [200, 170, 40]])


def value_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth random texture in [0, 1]: a coarse random grid, bilinearly upsampled. float [H, W]."""
    grid = rng.random((int(height / cell) + 2, int(width / cell) + 2))
    ys, xs = np.arange(height) / cell, np.arange(width) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    rows = grid[y0] * (1 - fy) + grid[y0 + 1] * fy  # [H, gw]
    return rows[:, x0] * (1 - fx) + rows[:, x0 + 1] * fx  # [H, W]


def paint(image: np.ndarray, label: np.ndarray, mask: np.ndarray, colour: np.ndarray, cls: int) -> None:
    """Draw ``colour`` (RGB or per-pixel [h, w, 3]) where ``mask``; later layers occlude earlier ones."""
    image[mask] = colour[mask] if colour.ndim == 3 else colour
    label[mask] = cls


def box(top: float, bottom: float, left: float, right: float, height: int, width: int) -> tuple[slice, slice]:
    """The pixel window of an object, clipped to the image: objects are drawn inside it only (speed)."""
    y0, y1 = int(np.clip(np.floor(top), 0, height)), int(np.clip(np.ceil(bottom) + 1, 0, height))
    x0, x1 = int(np.clip(np.floor(left), 0, width)), int(np.clip(np.ceil(right) + 1, 0, width))
    return slice(y0, y1), slice(x0, x1)


def draw_building(rng, style: Style, canvas: tuple, foot: float, cx: float, scale: float) -> None:
    """A rectangle with a grid of windows; at dusk some windows are lit."""
    image, label, emissive, yy, xx = canvas
    height, width = label.shape
    w, h = width * scale * rng.uniform(0.12, 0.28), height * scale * rng.uniform(0.25, 0.5)
    left, top = cx - w / 2, foot - h
    sy, sx = box(top, foot, left, left + w, height, width)
    ly, lx = yy[sy], xx[:, sx]  # [h, 1], [1, w]
    body = (lx >= left) & (lx < left + w) & (ly >= top) & (ly < foot)  # [h, w]
    if not body.any():
        return
    colour = BUILDING_COLOURS[rng.integers(len(BUILDING_COLOURS))] * rng.uniform(0.85, 1.1)
    wall = colour * (0.9 + 0.15 * value_noise(rng, *body.shape, 2))[..., None]  # [h, w, 3]
    px, py = rng.integers(*style.window_period, size=2)
    col, row = np.floor((lx - left) / px), np.floor((ly - top) / py)
    windows = body & ((lx - left) % px >= 0.35 * px) & ((ly - top) % py >= 0.45 * py) & (foot - ly > py)
    lit = rng.random((64, 64)) < style.lit_windows  # which window (row, column) is lit
    lit_px = windows & lit[np.clip(row, 0, 63).astype(int), np.clip(col, 0, 63).astype(int)]
    wall[windows] = np.array([55, 70, 90]) + 40 * rng.random()
    wall[lit_px] = np.array([255, 215, 130])
    emissive[sy, sx][body] = False
    emissive[sy, sx] |= lit_px
    paint(image[sy, sx], label[sy, sx], body, wall, BUILDING)


def draw_tree(rng, style: Style, canvas: tuple, foot: float, cx: float, scale: float) -> None:
    """A leafy blob with a ragged outline on a trunk (the trunk is labelled tree too)."""
    image, label, emissive, yy, xx = canvas
    height, width = label.shape
    rx = width * scale * rng.uniform(0.05, 0.1)
    ry = rx * rng.uniform(1.0, 1.5)
    trunk_h = ry * rng.uniform(0.4, 0.8)
    cy = foot - trunk_h - ry
    sy, sx = box(cy - 1.2 * ry, foot, cx - 1.2 * rx, cx + 1.2 * rx, height, width)
    ly, lx = yy[sy], xx[:, sx]  # [h, 1], [1, w]
    leaves = value_noise(rng, sy.stop - sy.start, sx.stop - sx.start, style.leaf_cell)  # [h, w]
    blob = ((lx - cx) / rx) ** 2 + ((ly - cy) / ry) ** 2 < 0.8 + 0.5 * leaves
    trunk = (np.abs(lx - cx) <= max(rx * 0.12, 0.6)) & (ly >= cy) & (ly < foot)
    tree = blob | trunk
    green = np.array([50, 110, 40]) * rng.uniform(0.8, 1.2)
    tex = green * (0.45 + 0.9 * leaves)[..., None]  # [h, w, 3]
    tex[trunk & ~blob] = np.array([90, 65, 40])
    emissive[sy, sx][tree] = False
    paint(image[sy, sx], label[sy, sx], tree, tex, TREE)


def draw_car(rng, style: Style, canvas: tuple, foot: float, cx: float, w: float) -> None:
    """A rounded box with a cabin, two wheels and lamps that shine at dusk."""
    image, label, emissive, yy, xx = canvas
    height, width = label.shape
    h = w * rng.uniform(0.45, 0.6)
    cy = foot - h * 0.45
    sy, sx = box(foot - 1.2 * h, foot, cx - w / 2, cx + w / 2, height, width)
    ly, lx = yy[sy], xx[:, sx]  # [h, 1], [1, w]
    body = np.abs((lx - cx) / (w / 2)) ** 4 + np.abs((ly - cy) / (h * 0.32)) ** 4 <= 1  # a rounded box
    cabin = np.abs((lx - cx) / (w * 0.33)) ** 4 + np.abs((ly - (cy - h * 0.35)) / (h * 0.25)) ** 4 <= 1
    r = max(h * 0.17, 0.8)
    wheels = ((np.abs(lx - cx) - w * 0.3) ** 2 + (ly - (foot - r)) ** 2) <= r * r
    car = body | cabin | wheels
    paint_rgb = CAR_COLOURS[rng.integers(len(CAR_COLOURS))] * rng.uniform(0.85, 1.1)
    tex = np.broadcast_to(paint_rgb, car.shape + (3,)).copy()  # [h, w, 3]
    tex[cabin & ~body] = np.array([70, 90, 110])
    tex[wheels] = np.array([20, 20, 22])
    lamp = body & (np.abs(np.abs(lx - cx) - w * 0.36) <= max(w * 0.06, 0.6)) & (np.abs(ly - cy) <= max(h * 0.07, 0.6))
    emissive[sy, sx][car] = False
    if style.lights:
        tex[lamp] = np.array([255, 240, 200]) if rng.random() < 0.5 else np.array([255, 60, 40])
        emissive[sy, sx] |= lamp
    else:
        tex[lamp] = np.array([230, 200, 150])
    paint(image[sy, sx], label[sy, sx], car, tex, CAR)


def render_scene(rng: np.random.Generator, *, domain: str, height: int = HEIGHT, width: int = WIDTH) -> Pair:
    """One street scene: uint8 [H, W, 3] image and int64 [H, W] label (every pixel has a class)."""
    style = STYLES[domain]
    yy = np.arange(height, dtype=np.float64)[:, None]  # [H, 1]
    xx = np.arange(width, dtype=np.float64)[None, :]  # [1, W]
    image = np.zeros((height, width, 3))
    label = np.zeros((height, width), dtype=np.int64)
    emissive = np.zeros((height, width), dtype=bool)  # lights keep their colour through the dusk darkening
    canvas = (image, label, emissive, yy, xx)
    scale = rng.uniform(*style.object_scale)

    # sky: vertical gradient with faint clouds
    base = int(height * rng.uniform(0.48, 0.58))
    t = np.clip(yy / base, 0, 1)[..., None]  # [H, 1, 1]
    sky = np.array(style.sky_top) * (1 - t) + np.array(style.sky_horizon) * t  # [H, 1, 3]
    image[:] = sky + 25 * (value_noise(rng, height, width, 12) ** 3)[..., None]  # [H, W, 3]

    # wavy horizon: a distant tree line between the sky and the ground
    phase = rng.uniform(0, 2 * np.pi, 2)
    depth = height * scale * rng.uniform(0.05, 0.1)
    amp = height * rng.uniform(0.01, 0.03)
    wave = amp * (np.sin(xx / width * 3 * np.pi + phase[0]) + 0.5 * np.sin(xx / 9 + phase[1]))  # [1, W]
    far = yy >= base - depth - wave  # [H, W]
    far_tex = np.array([40, 80, 45]) * (0.6 + 0.5 * value_noise(rng, height, width, style.leaf_cell + 1))[..., None]
    paint(image, label, far, far_tex, TREE)

    # ground: grass verge, and the road as a trapezoid narrowing to the horizon
    s = np.clip((yy - base) / (height - base), 0, 1)  # [H, 1] perspective depth: 0 at the horizon, 1 at the bottom
    centre = width * (rng.uniform(0.4, 0.6) * (1 - s) + rng.uniform(0.3, 0.7) * s)  # [H, 1]
    half = width * (rng.uniform(0.03, 0.08) * (1 - s) + rng.uniform(0.55, 0.85) * s)  # [H, 1]
    g = slice(base, height)
    grass = np.array([95, 130, 50]) * (0.7 + 0.5 * value_noise(rng, height - base, width, 1.5))[..., None]
    image[g], label[g] = grass, TREE
    road = np.abs(xx - centre[g]) <= half[g]  # [h, W]
    asphalt = np.array([110, 108, 112]) * (0.85 + 0.3 * value_noise(rng, height - base, width, 1.2))[..., None]
    paint(image[g], label[g], road, asphalt, ROAD)
    dash = np.sin(rng.uniform(25, 40) / (yy[g] - base + 3) * 2 * np.pi) > 0  # dashes shrink towards the horizon
    lane = road & (np.abs(xx - centre[g]) <= 0.03 * half[g] + 0.3) & dash
    edge = road & (np.abs(np.abs(xx - centre[g]) - 0.9 * half[g]) <= 0.02 * half[g] + 0.3)
    paint(image[g], label[g], lane | edge, np.array([235, 235, 225]), ROAD)

    # buildings and trees standing on the horizon, far ones first so near ones occlude them
    kinds = [BUILDING] * int(rng.integers(3, 7)) + [TREE] * int(rng.integers(2, 6))
    feet = base + height * rng.uniform(0, 0.1, len(kinds))
    for i in np.argsort(feet):
        draw = draw_building if kinds[i] == BUILDING else draw_tree
        draw(rng, style, canvas, feet[i], rng.uniform(-0.05, 1.05) * width, scale)

    # cars on the road, nearer (lower) ones drawn last and larger
    for foot in np.sort(base + (height - base) * rng.uniform(0.15, 1.05, int(rng.integers(1, 5)))):
        row = min(int(foot), height - 1)
        near = np.clip((foot - base) / (height - base), 0, 1)
        w = width * scale * rng.uniform(0.18, 0.28) * (0.3 + 0.7 * near)
        draw_car(rng, style, canvas, foot, centre[row, 0] + half[row, 0] * rng.uniform(-0.6, 0.6), w)

    # light, colour and sensor: the domain shift proper
    light = image.copy()
    mean = image.mean()
    image = (mean + (image - mean) * style.contrast) * style.brightness * np.array(style.tint)
    image[emissive] = light[emissive]
    image = image + rng.normal(0, style.noise, (height, width, 1)) + rng.normal(0, style.noise / 3, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8), label


class SyntheticDecoder:
    """Scene ``index`` of a seeded generator: the same (seed, index) always gives the same scene."""

    def __init__(self, *, domain: str, seed: int, height: int = HEIGHT, width: int = WIDTH) -> None:
        self.domain, self.seed, self.height, self.width = domain, seed, height, width

    def __call__(self, record: Record) -> Pair:
        rng = np.random.default_rng(self.seed * 100003 + record.index)
        return render_scene(rng, domain=self.domain, height=self.height, width=self.width)
