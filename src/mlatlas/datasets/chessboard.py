"""Chessboard images rendered through a known camera, for calibration.

A flat board of ``(cols + 1) × (rows + 1)`` squares (``cols × rows`` inner corners, OpenCV's
``patternSize``) with a white rim sits at a random tilted pose in front of a pinhole camera
with OpenCV's lens model. Each pixel is rendered by tracing its ray back: the distorted
normalised coordinates are undistorted by fixed-point iteration, the ray is intersected
with the board plane ``Z = 0``, and the square under it decides black or white; ``s × s``
samples per pixel anti-alias the edges, and Gaussian noise is added. Everything is a pure
function of the seed.

==============  ===========================================================================
``K, dist``     the true camera (``dist = k1, k2, p1, p2, k3``)
``pattern``     ``(cols, rows)`` inner corners, e.g. ``(9, 6)``
``square``      side of one square in board units (mm)
board points    ``[cols·rows, 3]``: ``(c·square, r·square, 0)``, row by row (OpenCV's order)
``rvec, tvec``  pose: ``x_cam = R(rvec) X + tvec``
image           ``[H, W]`` uint8, pixel centres at integer coordinates (OpenCV's convention)
==============  ===========================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.transform import Rotation

from mlatlas.vision.calibration import project_points, undistort

__all__ = ["BoardViews", "Camera", "board_points", "random_board_poses", "render_board",
           "render_views"]


@dataclass(frozen=True)
class Camera:
    """A pinhole camera with lens distortion.

    Attributes:
        K: ``[3, 3]`` camera matrix.
        dist: ``(k1, k2, p1, p2, k3)``.
        image_size: ``(width, height)`` in pixels.
    """

    K: np.ndarray
    dist: np.ndarray
    image_size: tuple[int, int]

    @classmethod
    def default(cls) -> Camera:
        """640 × 480, fx = 620, fy = 610, principal point off-centre, barrel distortion."""
        return cls(np.array([[620.0, 0, 331.5], [0, 610.0, 236.0], [0, 0, 1]]),
                   np.array([-0.21, 0.06, 0.0008, -0.0006, 0.0]), (640, 480))


def board_points(pattern: tuple[int, int] = (9, 6), square: float = 25.0) -> np.ndarray:
    """Inner-corner coordinates ``[cols·rows, 3]`` on the plane ``Z = 0``, row by row."""
    cols, rows = pattern
    if cols < 2 or rows < 2:
        raise ValueError(f"pattern must be (cols >= 2, rows >= 2) inner corners, got {pattern}")
    gx, gy = np.meshgrid(np.arange(cols), np.arange(rows))
    return np.stack([gx.ravel(), gy.ravel(), np.zeros(gx.size)], 1) * square


def random_board_poses(n: int, camera: Camera, pattern: tuple[int, int] = (9, 6),
                       square: float = 25.0, max_tilt_deg: float = 40.0,
                       distance: tuple[float, float] = (330.0, 520.0), margin_px: float = 25.0,
                       seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n`` tilted poses whose whole board (with its rim) stays inside the image.

    Raises:
        ValueError: ``n < 1``, or no pose fits (the board is too large for the camera).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    cols, rows = pattern
    centre = np.array([(cols - 1) * square / 2, (rows - 1) * square / 2, 0])
    rim = np.array([[-2, -2, 0], [cols + 1, -2, 0], [-2, rows + 1, 0], [cols + 1, rows + 1, 0]])
    w, h = camera.image_size
    poses = []
    for _ in range(5000 * n):
        tilt = np.radians(rng.uniform(-max_tilt_deg, max_tilt_deg, 2))
        spin = np.radians(rng.uniform(-20, 20))
        rot = Rotation.from_euler("xyz", [tilt[0], tilt[1], spin])
        z = rng.uniform(*distance)
        offset = np.array([rng.uniform(-0.15, 0.15) * z, rng.uniform(-0.1, 0.1) * z, z])
        tvec = offset - rot.apply(centre)
        uv = project_points(rim * square, rot.as_rotvec(), tvec, camera.K, camera.dist)
        if (uv.min(0) > margin_px).all() and (uv.max(0) < np.array([w, h]) - margin_px).all():
            poses.append((rot.as_rotvec(), tvec))
            if len(poses) == n:
                return poses
    raise ValueError(f"found {len(poses)} of {n} board poses that fit a {w}×{h} image; use a "
                     "smaller board or a larger distance")


def render_board(camera: Camera, rvec: np.ndarray, tvec: np.ndarray,
                 pattern: tuple[int, int] = (9, 6), square: float = 25.0, supersample: int = 3,
                 noise: float = 2.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render one view of the board as a ``[H, W]`` uint8 image.

    Args:
        camera: The camera.
        rvec, tvec: The board's pose.
        pattern: Inner corners ``(cols, rows)``.
        square: Square side (board units).
        supersample: ``s``: ``s × s`` rays per pixel.
        noise: Standard deviation of the Gaussian pixel noise (grey levels).
        rng: Noise generator (default seeded 0).
    """
    w, h = camera.image_size
    K = camera.K
    # exact ray tracing at the pixel corners, bilinear inside a pixel (the map is smooth)
    uu, vv = np.meshgrid(np.arange(w + 1) - 0.5, np.arange(h + 1) - 0.5)
    xy_d = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1]], -1)
    xy = undistort(xy_d, camera.dist)
    rays = np.concatenate([xy, np.ones_like(xy[..., :1])], -1)  # camera frame
    rot_t = Rotation.from_rotvec(np.asarray(rvec, float)).as_matrix().T
    d = rays @ rot_t.T  # Rᵀ d: the ray in board coordinates
    o = -rot_t @ np.asarray(tvec, float)  # the camera centre in board coordinates
    lam = -o[2] / np.where(np.abs(d[..., 2]) < 1e-12, 1e-12, d[..., 2])  # Z = 0
    corner_x, corner_y = o[0] + lam * d[..., 0], o[1] + lam * d[..., 1]
    f = ((np.arange(supersample) + 0.5) / supersample)[None, :, None, None]  # row fraction
    g = ((np.arange(supersample) + 0.5) / supersample)[None, None, None, :]  # column fraction

    def inside(c: np.ndarray) -> np.ndarray:  # [h, s, w, s] samples
        c00, c01 = c[:-1, None, :-1, None], c[:-1, None, 1:, None]
        c10, c11 = c[1:, None, :-1, None], c[1:, None, 1:, None]
        return (1 - f) * ((1 - g) * c00 + g * c01) + f * ((1 - g) * c10 + g * c11)

    bx, by = inside(corner_x), inside(corner_y)
    front = inside((lam > 0).astype(float)) > 0.5
    uu = np.arange(w)[None, None, :, None] + 0 * bx
    vv = np.arange(h)[:, None, None, None] + 0 * bx
    cols, rows = pattern
    ix, iy = np.floor(bx / square), np.floor(by / square)
    on_squares = (ix >= -1) & (ix <= cols - 1) & (iy >= -1) & (iy <= rows - 1)
    on_board = (bx >= -2 * square) & (bx <= (cols + 1) * square) & \
               (by >= -2 * square) & (by <= (rows + 1) * square) & front
    # box-filtered checker: the footprint of a sample spans (|∂b/∂u| + |∂b/∂v|)/s board units
    # along each board axis; a ±1 square wave filtered by it is clamp(2e/width, −1, 1) with e
    # the signed distance to the nearest edge, and the 2-D checker is the product of the two
    widths = []
    for c in (corner_x, corner_y):
        du = np.abs(np.diff(c, axis=1)[:-1] + np.diff(c, axis=1)[1:]) / 2
        dv = np.abs(np.diff(c, axis=0)[:, :-1] + np.diff(c, axis=0)[:, 1:]) / 2
        widths.append(((du + dv) / supersample)[:, None, :, None])
    waves = []
    for b, i, width in ((bx, ix, widths[0]), (by, iy, widths[1])):
        frac = b / square - i
        edge = (0.5 - np.abs(frac - 0.5)) * square  # distance to the nearest edge
        sign = np.where(i % 2 == 0, 1.0, -1.0)
        waves.append(sign * np.clip(2 * edge / np.maximum(width, 1e-9), 0, 1))
    black = np.where(on_squares, 0.5 + 0.5 * waves[0] * waves[1], 0.0)  # black fraction
    grey = np.where(on_board, 225.0 - 200.0 * black,
                    110.0 + 30.0 * np.sin(uu / 97.0) * np.cos(vv / 61.0))
    img = grey.mean((1, 3))
    rng = np.random.default_rng(0) if rng is None else rng
    return np.clip(np.rint(img + rng.normal(0, noise, img.shape)), 0, 255).astype(np.uint8)


@dataclass
class BoardViews:
    """Rendered views of one board seen by one or more rigidly mounted cameras.

    Attributes:
        cameras: The true cameras.
        rig: Per camera ``(R, T)`` from camera 0: ``x_k = R x_0 + T``.
        poses: Per view the board pose in camera 0.
        images: ``images[k][i]``: camera ``k``, view ``i``.
        object_points: The board's inner corners ``[N, 3]``.
        true_corners: ``true_corners[k][i]``: exact projections ``[N, 2]``.
    """

    cameras: list[Camera]
    rig: list[tuple[np.ndarray, np.ndarray]]
    poses: list[tuple[np.ndarray, np.ndarray]]
    images: list[list[np.ndarray]] = field(default_factory=list)
    object_points: np.ndarray | None = None
    true_corners: list[list[np.ndarray]] = field(default_factory=list)


def render_views(n_views: int, cameras: list[Camera], rig: list[tuple[np.ndarray, np.ndarray]],
                 pattern: tuple[int, int] = (9, 6), square: float = 25.0, supersample: int = 3,
                 noise: float = 2.0, seed: int = 0) -> BoardViews:
    """Render ``n_views`` board poses (chosen to fit every camera) through every camera.

    Args:
        n_views: Number of board poses.
        cameras: The cameras; camera 0 defines the frame.
        rig: Per camera ``(R, T)`` from camera 0 (``(I, 0)`` first).
        pattern, square, supersample, noise: As :func:`render_board`.
        seed: Seed of the poses and the noise.
    """
    if len(rig) != len(cameras):
        raise ValueError(f"rig needs one (R, T) per camera, got {len(rig)} for {len(cameras)}")
    obj = board_points(pattern, square)
    rng = np.random.default_rng(seed)
    poses: list[tuple[np.ndarray, np.ndarray]] = []
    tries = 0
    while len(poses) < n_views:
        tries += 1
        cand = random_board_poses(1, cameras[0], pattern, square, seed=seed * 100_003 + tries)[0]
        ok = True
        for cam, (r, t) in zip(cameras[1:], rig[1:]):
            rv, tv = _in_camera(cand, r, t)
            rim = board_points((pattern[0] + 4, pattern[1] + 4), square) - [2 * square, 2 * square, 0]
            uv = project_points(rim, rv, tv, cam.K, cam.dist)
            ok &= bool((uv.min(0) > 10).all() and (uv.max(0) < np.array(cam.image_size) - 10).all())
        if ok:
            poses.append(cand)
    views = BoardViews(cameras, rig, poses, object_points=obj)
    for cam, (r, t) in zip(cameras, rig):
        pose_k = [_in_camera(p, r, t) for p in poses]
        views.images.append([render_board(cam, rv, tv, pattern, square, supersample, noise, rng)
                             for rv, tv in pose_k])
        views.true_corners.append([project_points(obj, rv, tv, cam.K, cam.dist)
                                   for rv, tv in pose_k])
    return views


def _in_camera(pose: tuple[np.ndarray, np.ndarray], r: np.ndarray,
               t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A board pose in camera 0 → the same board in the camera ``x_k = R x_0 + T``."""
    rv, tv = pose
    rot = Rotation.from_matrix(r) * Rotation.from_rotvec(rv)
    return rot.as_rotvec(), r @ tv + t
