"""Camera calibration from views of a plane: Zhang's method.

A pinhole camera maps a point ``X`` of a planar target (``Z = 0``) to the image by a
homography ``H = λ K [r1 r2 t]``. Zhang (2000, IEEE TPAMI 22(11):1330–1334; MSR-TR-98-71)
turns each view's homography into two linear constraints on ``B = K⁻ᵀK⁻¹`` (``r1 ⊥ r2``,
``|r1| = |r2|``), solves ``V b = 0`` for the intrinsics in closed form, recovers every
view's pose from ``K⁻¹H``, and refines everything — with lens distortion — by minimising
the reprojection error with Levenberg–Marquardt. The lens model and the return values are
OpenCV's (``cv2.calibrateCamera``), so results read both ways.

=============  ===========================================================================
``K``          ``[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]`` (zero skew, as OpenCV)
``dist``       ``(k1, k2, p1, p2, k3)``: radial ``1 + k1 r² + k2 r⁴ + k3 r⁶`` and
               tangential ``p1, p2`` (Brown–Conrady, OpenCV's order)
``rvec, tvec`` a view's pose: ``x_cam = R(rvec) X + tvec`` (Rodrigues vector)
``H``          ``[3, 3]`` homography of a view, board ``(X, Y, 1)`` → pixel
``v_ij``       eq. (7): ``[h1i h1j, h1i h2j + h2i h1j, h2i h2j, h3i h1j + h1i h3j,
               h3i h2j + h2i h3j, h3i h3j]``
``rms``        ``sqrt(Σ ‖x̂ − x‖² / #points)`` over all views (OpenCV's RMS), pixels
=============  ===========================================================================

Stereo extrinsics and multi-camera chaining are in :mod:`mlatlas.vision.stereo_calibration`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

__all__ = ["CalibrationResult", "as_views", "block_jacobian", "calibrate_camera",
           "check_board_tilts", "distort", "estimate_pose", "homography_dlt", "intrinsics_from_homographies", "pose_from_homography",
           "project_points", "undistort"]

_MIN_VIEWS = 3


class CalibrationResult(NamedTuple):
    """What :func:`calibrate_camera` returns; unpacks like OpenCV's 5-tuple.

    Attributes:
        rms: Reprojection RMS in pixels.
        K: ``[3, 3]`` camera matrix.
        dist: ``[5]`` distortion ``(k1, k2, p1, p2, k3)``.
        rvecs: Per-view Rodrigues rotations, each ``[3]``.
        tvecs: Per-view translations, each ``[3]``.
    """

    rms: float
    K: np.ndarray
    dist: np.ndarray
    rvecs: list[np.ndarray]
    tvecs: list[np.ndarray]


def distort(xy: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Apply the lens model to normalised coordinates ``[..., 2]`` (``x/z, y/z``)."""
    k1, k2, p1, p2, k3 = dist
    x, y = xy[..., 0], xy[..., 1]
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))  # 1 + k1 r² + k2 r⁴ + k3 r⁶
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return np.stack([xd, yd], -1)


def undistort(xy_d: np.ndarray, dist: np.ndarray, iterations: int = 20) -> np.ndarray:
    """Invert :func:`distort` by fixed-point iteration (as ``cv2.undistortPoints``)."""
    k1, k2, p1, p2, k3 = dist
    xy = xy_d.copy()
    for _ in range(iterations):
        x, y = xy[..., 0], xy[..., 1]
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        dx = 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        dy = p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        xy = np.stack([(xy_d[..., 0] - dx) / radial, (xy_d[..., 1] - dy) / radial], -1)
    return xy


def project_points(object_points: np.ndarray, rvec: np.ndarray, tvec: np.ndarray, K: np.ndarray,
                   dist: np.ndarray) -> np.ndarray:
    """Pixels ``[N, 2]`` of points ``[N, 3]`` (as ``cv2.projectPoints``)."""
    cam = Rotation.from_rotvec(np.asarray(rvec, float).ravel()).apply(object_points)
    cam = cam + np.asarray(tvec, float).ravel()
    xy = distort(cam[:, :2] / cam[:, 2:3], dist)
    return np.stack([K[0, 0] * xy[:, 0] + K[0, 2], K[1, 1] * xy[:, 1] + K[1, 2]], -1)


def _normaliser(pts: np.ndarray) -> np.ndarray:
    """Hartley's similarity: centroid to 0, mean distance to √2."""
    c = pts.mean(0)
    s = np.sqrt(2) / max(np.linalg.norm(pts - c, axis=1).mean(), 1e-12)
    return np.array([[s, 0, -s * c[0]], [0, s, -s * c[1]], [0, 0, 1]])


def homography_dlt(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Normalised DLT homography ``dst ~ H src`` from ``N ≥ 4`` point pairs ``[N, 2]``.

    Both point sets are normalised (Hartley 1997) before the SVD and the result
    de-normalised: ``H = T_dst⁻¹ Ĥ T_src``, scaled to ``H[2, 2] = 1``.
    """
    ts, td = _normaliser(src), _normaliser(dst)
    s = src @ ts[:2, :2].T + ts[:2, 2]
    d = dst @ td[:2, :2].T + td[:2, 2]
    n = len(s)
    a = np.zeros((2 * n, 9))
    a[0::2, 0:2], a[0::2, 2] = s, 1
    a[0::2, 6:8], a[0::2, 8] = -d[:, :1] * s, -d[:, 0]
    a[1::2, 3:5], a[1::2, 5] = s, 1
    a[1::2, 6:8], a[1::2, 8] = -d[:, 1:] * s, -d[:, 1]
    h = np.linalg.svd(a)[2][-1].reshape(3, 3)  # the null vector of A h = 0
    h = np.linalg.solve(td, h @ ts)
    return h / h[2, 2]


def _v(h: np.ndarray, i: int, j: int) -> np.ndarray:
    hi, hj = h[:, i], h[:, j]
    # eq. (7)
    return np.array([hi[0] * hj[0], hi[0] * hj[1] + hi[1] * hj[0], hi[1] * hj[1],
                     hi[2] * hj[0] + hi[0] * hj[2], hi[2] * hj[1] + hi[1] * hj[2], hi[2] * hj[2]])


def intrinsics_from_homographies(hs: list[np.ndarray], image_size: tuple[int, int]) -> np.ndarray:
    """Zhang's closed-form ``K`` (zero skew) from ``n ≥ 3`` view homographies.

    Pixels are first mapped to ``[-1, 1]``-ish coordinates (``N``: centre and scale by the
    image size) so that ``V`` is well conditioned; ``K = N⁻¹ K̂``.

    Raises:
        ValueError: the views do not determine ``K`` (parallel boards: ``V`` loses rank), or
            ``B`` is not positive definite.
    """
    w, h = image_size
    s = 2.0 / max(w, h)
    norm = np.array([[s, 0, -s * w / 2], [0, s, -s * h / 2], [0, 0, 1]])
    rows = []
    for hm in hs:
        hn = norm @ hm
        hn = hn / np.linalg.norm(hn[:, :2])  # only h1, h2 enter the constraints
        rows += [_v(hn, 0, 1), _v(hn, 0, 0) - _v(hn, 1, 1)]  # eq. (8): V b = 0
    rows.append([0, 1, 0, 0, 0, 0])  # zero skew: B12 = 0
    sv, vt = np.linalg.svd(np.array(rows))[1:]
    # a unique null vector needs rank 5: parallel boards repeat the same two constraints
    if sv[-2] < 1e-4 * sv[0]:
        raise ValueError(f"degenerate views: the {len(hs)} boards do not determine the "
                         f"intrinsics (singular values of V: {np.array2string(sv, precision=2)}"
                         "); parallel boards add no constraint — tilt the board differently "
                         "between views")
    b11, b12, b22, b13, b23, b33 = vt[-1] if vt[-1][0] > 0 else -vt[-1]
    # Zhang, appendix B
    v0 = (b12 * b13 - b11 * b23) / (b11 * b22 - b12 ** 2)
    lam = b33 - (b13 ** 2 + v0 * (b12 * b13 - b11 * b23)) / b11
    if lam / b11 <= 0 or b11 * b22 - b12 ** 2 <= 0:
        raise ValueError("degenerate views: B = K^-T K^-1 is not positive definite; the board "
                         "poses do not determine the intrinsics")
    alpha = np.sqrt(lam / b11)
    beta = np.sqrt(lam * b11 / (b11 * b22 - b12 ** 2))
    u0 = -b13 * alpha ** 2 / lam  # γ = 0
    k_hat = np.array([[alpha, 0, u0], [0, beta, v0], [0, 0, 1]])
    return np.linalg.solve(norm, k_hat)


def pose_from_homography(K: np.ndarray, hm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rvec, tvec)`` of a view from ``K⁻¹H = λ[r1 r2 t]`` (R made orthonormal by SVD)."""
    a = np.linalg.solve(K, hm)
    lam = 1 / np.linalg.norm(a[:, 0])
    if a[2, 2] * lam < 0:  # the board lies in front of the camera: t_z > 0
        lam = -lam
    r1, r2, t = lam * a[:, 0], lam * a[:, 1], lam * a[:, 2]
    u, _, vt = np.linalg.svd(np.stack([r1, r2, np.cross(r1, r2)], 1))
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        rot = u @ np.diag([1, 1, -1]) @ vt
    return Rotation.from_matrix(rot).as_rotvec(), t


def estimate_pose(object_points: np.ndarray, image_points: np.ndarray, K: np.ndarray,
                  dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A planar board's pose for a known camera (``solvePnP`` for ``Z = 0`` targets):
    homography on undistorted normalised points, then LM on the reprojection error."""
    xy = undistort((image_points - K[:2, 2]) / np.diag(K)[:2], dist)
    rvec, tvec = pose_from_homography(np.eye(3), homography_dlt(object_points[:, :2], xy))

    def residual(p):
        return (project_points(object_points, p[:3], p[3:], K, dist) - image_points).ravel()

    p = least_squares(residual, np.concatenate([rvec, tvec]), method="lm").x
    return p[:3], p[3:]


def check_board_tilts(rvecs: list[np.ndarray], min_degrees: float = 3.0) -> None:
    """Refuse views whose boards are (nearly) parallel: Zhang's degenerate configuration.

    Raises:
        ValueError: every pair of board normals ``R_i e_z`` is within ``min_degrees``.
    """
    normals = Rotation.from_rotvec(np.stack(rvecs)).apply([0.0, 0.0, 1.0])
    cos = np.clip(normals @ normals.T, -1, 1)
    widest = float(np.degrees(np.arccos(cos.min())))
    if widest < min_degrees:
        raise ValueError(f"degenerate views: all {len(rvecs)} boards are parallel (their "
                         f"normals differ by at most {widest:.2f}° < {min_degrees}°); parallel "
                         "boards add no constraint on the intrinsics — tilt the board "
                         "differently between views")


def block_jacobian(residual, p: np.ndarray, n_shared: int, view_of_row: np.ndarray,
                   per_view: int = 6) -> np.ndarray:
    """Central-difference Jacobian of a bundle residual whose views do not interact.

    ``p`` = ``n_shared`` parameters every residual depends on, then ``per_view`` parameters
    per view; residual row ``r`` depends only on view ``view_of_row[r]``'s own block. The
    ``k``-th parameter of every view is perturbed at once, so the cost is
    ``2·(n_shared + per_view)`` residual calls whatever the number of views.
    """
    rows = np.arange(len(view_of_row))
    n_views = (len(p) - n_shared) // per_view
    jac = np.zeros((len(rows), len(p)))
    for j in range(n_shared + per_view):
        cols = (np.array([j]) if j < n_shared else
                n_shared + per_view * np.arange(n_views) + (j - n_shared))
        step = 1e-6 * np.maximum(np.abs(p[cols]), 1.0)
        hi, lo = p.copy(), p.copy()
        hi[cols] += step
        lo[cols] -= step
        diff = residual(hi) - residual(lo)
        if j < n_shared:
            jac[:, j] = diff / (2 * step[0])
        else:
            jac[rows, cols[view_of_row]] = diff / (2 * step[view_of_row])
    return jac


def as_views(points, name: str, dims: int) -> list[np.ndarray]:
    """Validate a list of per-view point arrays ``[N_i, dims]`` (or ``[N_i, 1, dims]``)."""
    if not isinstance(points, (list, tuple)):
        raise TypeError(f"{name} must be a list with one [N, {dims}] array per view, got "
                        f"{type(points).__name__}")
    views = []
    for i, p in enumerate(points):
        a = np.asarray(p, dtype=np.float64)
        if a.ndim == 3 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 2 or a.shape[1] != dims or len(a) < 4:
            raise ValueError(f"{name}[{i}] must have shape [N >= 4, {dims}], got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"{name}[{i}] holds NaN or infinite values")
        views.append(a)
    return views


def calibrate_camera(object_points, image_points, image_size) -> CalibrationResult:
    """Intrinsics, distortion and per-view poses from ``n ≥ 3`` views of a planar target.

    Args:
        object_points: Per view ``[N_i, 3]`` board points with ``Z = 0`` (any unit).
        image_points: Per view ``[N_i, 2]`` (or ``[N_i, 1, 2]``) detected pixels.
        image_size: ``(width, height)`` in pixels, as OpenCV.

    Returns:
        :class:`CalibrationResult` ``(rms, K, dist, rvecs, tvecs)``.

    Raises:
        TypeError, ValueError: bad shapes, fewer than 3 views, non-planar targets, mismatched
            counts, or degenerate (parallel) views.
    """
    obj = as_views(object_points, "object_points", 3)
    img = as_views(image_points, "image_points", 2)
    if len(obj) != len(img):
        raise ValueError(f"object_points and image_points need one entry per view each, got "
                         f"{len(obj)} and {len(img)}")
    if len(obj) < _MIN_VIEWS:
        raise ValueError(f"calibration needs at least {_MIN_VIEWS} views of the board, got "
                         f"{len(obj)}")
    for i, (o, p) in enumerate(zip(obj, img)):
        if len(o) != len(p):
            raise ValueError(f"view {i}: {len(o)} object points but {len(p)} image points")
        if np.abs(o[:, 2]).max() > 1e-9 * max(1.0, np.abs(o).max()):
            raise ValueError(f"object_points[{i}] must lie on the plane Z = 0 (a planar "
                             f"target), got |Z| up to {np.abs(o[:, 2]).max():.3g}")
    if (len(image_size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0
                                        for s in image_size)):
        raise ValueError(f"image_size must be (width, height) positive ints, got {image_size!r}")
    hs = [homography_dlt(o[:, :2], p) for o, p in zip(obj, img)]
    K = intrinsics_from_homographies(hs, tuple(image_size))
    poses = [pose_from_homography(K, hm) for hm in hs]
    check_board_tilts([rv for rv, _ in poses])
    n_views, sizes = len(obj), [len(o) for o in obj]
    obj_all, img_all = np.concatenate(obj), np.concatenate(img)

    def residual(p: np.ndarray) -> np.ndarray:
        rv, tv = p[9:].reshape(n_views, 2, 3).transpose(1, 0, 2)
        cam = (Rotation.from_rotvec(np.repeat(rv, sizes, 0)).apply(obj_all)
               + np.repeat(tv, sizes, 0))  # each point in its view's camera frame
        xy = distort(cam[:, :2] / cam[:, 2:3], p[4:9])
        uv = np.stack([p[0] * xy[:, 0] + p[2], p[1] * xy[:, 1] + p[3]], -1)
        return (uv - img_all).ravel()

    view_of_row = np.repeat(np.arange(n_views), 2 * np.array(sizes))
    p0 = np.concatenate([[K[0, 0], K[1, 1], K[0, 2], K[1, 2]], np.zeros(5),
                         np.concatenate([np.concatenate(pv) for pv in poses])])
    # Levenberg–Marquardt on Σ ‖x̂(K, dist, R_i, t_i; X) − x‖² (Zhang §3.2 / §3.3)
    p = least_squares(residual, p0, jac=lambda q: block_jacobian(residual, q, 9, view_of_row),
                      method="lm", xtol=1e-15, ftol=1e-15,
                      gtol=1e-15, x_scale="jac", max_nfev=100 * len(p0)).x
    err = residual(p).reshape(-1, 2)
    rms = float(np.sqrt((err ** 2).sum() / len(err)))
    K = np.array([[p[0], 0, p[2]], [0, p[1], p[3]], [0, 0, 1]])
    rv, tv = p[9:].reshape(n_views, 2, 3).transpose(1, 0, 2)
    return CalibrationResult(rms, K, p[4:9].copy(), list(rv.copy()), list(tv.copy()))
