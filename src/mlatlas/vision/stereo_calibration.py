"""Stereo extrinsics and multi-camera chaining on top of Zhang's single-camera calibration.

Two calibrated cameras that see the same board in the same instants are related by one
rigid motion ``x₂ = R x₁ + T``: every view ``i`` gives an estimate ``R = R₂ᵢ R₁ᵢᵀ``,
``T = t₂ᵢ − R t₁ᵢ`` from the two single-camera poses; their median starts a
Levenberg–Marquardt refinement of ``(R, T)`` and the board poses seen from camera 1 against
the reprojection error in both images (intrinsics held fixed, OpenCV's
``CALIB_FIX_INTRINSIC``). A rig of cameras is then one pose per camera in camera 0's frame,
composed along a chain of calibrated pairs ``0→1→2…`` (:func:`chain_extrinsics`).

==========  ===============================================================================
``R, T``    camera 1 → camera 2: ``x₂ = R x₁ + T`` (OpenCV's ``stereoCalibrate``)
``E``       essential matrix ``[T]ₓ R`` (``x₂ᵀ E x₁ = 0`` in normalised coordinates)
``F``       fundamental matrix ``K₂⁻ᵀ E K₁⁻¹``, scaled to ``F[2, 2] = 1`` as OpenCV
``rms``     ``sqrt(Σ ‖x̂ − x‖² / (2·#points))``: the sum over both images, each board
            point counted once per camera (OpenCV's stereo RMS)
==========  ===============================================================================

Reference: Zhang 2000 (IEEE TPAMI 22(11)); Hartley & Zisserman 2004, *Multiple View
Geometry*, §9.6 (E, F).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from mlatlas.vision.calibration import as_views, block_jacobian, distort, estimate_pose

__all__ = ["StereoResult", "chain_extrinsics", "skew", "stereo_calibrate"]


class StereoResult(NamedTuple):
    """What :func:`stereo_calibrate` returns; unpacks like ``cv2.stereoCalibrate``'s 9-tuple."""

    rms: float
    K1: np.ndarray
    dist1: np.ndarray
    K2: np.ndarray
    dist2: np.ndarray
    R: np.ndarray
    T: np.ndarray
    E: np.ndarray
    F: np.ndarray


def skew(t: np.ndarray) -> np.ndarray:
    """``[t]ₓ``: the matrix with ``[t]ₓ v = t × v``."""
    return np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])


def _check_camera(K, dist, name: str) -> tuple[np.ndarray, np.ndarray]:
    K, dist = np.asarray(K, float), np.asarray(dist, float).ravel()
    if K.shape != (3, 3) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"K{name} must be a [3, 3] camera matrix with fx, fy > 0, got "
                         f"{K.tolist() if K.size <= 9 else K.shape}")
    if dist.shape != (5,):
        raise ValueError(f"dist{name} must hold (k1, k2, p1, p2, k3), got shape {dist.shape}")
    return K, dist


def stereo_calibrate(object_points, image_points1, image_points2, K1, dist1, K2, dist2,
                     image_size) -> StereoResult:
    """Pose of camera 2 relative to camera 1 from simultaneous views of a board.

    Args:
        object_points: Per view ``[N_i, 3]`` board points (``Z = 0``).
        image_points1, image_points2: Per view ``[N_i, 2]`` pixels in camera 1 and 2.
        K1, dist1, K2, dist2: The cameras' intrinsics (held fixed).
        image_size: ``(width, height)`` (kept for OpenCV's signature).

    Returns:
        :class:`StereoResult` ``(rms, K1, dist1, K2, dist2, R, T, E, F)``.

    Raises:
        TypeError, ValueError: bad shapes, mismatched view or point counts, fewer than 3
            views, or bad camera parameters.
    """
    obj = as_views(object_points, "object_points", 3)
    im1 = as_views(image_points1, "image_points1", 2)
    im2 = as_views(image_points2, "image_points2", 2)
    if not len(obj) == len(im1) == len(im2):
        raise ValueError(f"object_points, image_points1, image_points2 need one entry per view, "
                         f"got {len(obj)}, {len(im1)}, {len(im2)}")
    if len(obj) < 3:
        raise ValueError(f"stereo calibration needs at least 3 views, got {len(obj)}")
    for i, (o, a, b) in enumerate(zip(obj, im1, im2)):
        if not len(o) == len(a) == len(b):
            raise ValueError(f"view {i}: {len(o)} object points, {len(a)} and {len(b)} image "
                             "points")
    del image_size
    K1, dist1 = _check_camera(K1, dist1, "1")
    K2, dist2 = _check_camera(K2, dist2, "2")
    pose1 = [estimate_pose(o, a, K1, dist1) for o, a in zip(obj, im1)]
    pose2 = [estimate_pose(o, b, K2, dist2) for o, b in zip(obj, im2)]
    rel = [(Rotation.from_rotvec(r2) * Rotation.from_rotvec(r1).inv(), t1, t2)
           for (r1, t1), (r2, t2) in zip(pose1, pose2)]
    r0 = np.median(np.stack([r.as_rotvec() for r, _, _ in rel]), 0)  # OpenCV: the median
    t0 = np.median(np.stack([t2 - r.apply(t1) for r, t1, t2 in rel]), 0)
    n_views, sizes = len(obj), [len(o) for o in obj]
    obj_all, img_all = np.concatenate(obj), np.concatenate([np.concatenate(im1), np.concatenate(im2)])

    def residual(p: np.ndarray) -> np.ndarray:
        rv, tv = p[6:].reshape(n_views, 2, 3).transpose(1, 0, 2)
        x1 = Rotation.from_rotvec(np.repeat(rv, sizes, 0)).apply(obj_all) + np.repeat(tv, sizes, 0)
        x2 = Rotation.from_rotvec(p[:3]).apply(x1) + p[3:6]  # x₂ = R x₁ + T
        uv = [np.stack([k[0, 0] * xy[:, 0] + k[0, 2], k[1, 1] * xy[:, 1] + k[1, 2]], -1)
              for k, xy in ((K1, distort(x1[:, :2] / x1[:, 2:3], dist1)),
                            (K2, distort(x2[:, :2] / x2[:, 2:3], dist2)))]
        return (np.concatenate(uv) - img_all).ravel()

    view = np.repeat(np.arange(n_views), 2 * np.array(sizes))
    view_of_row = np.concatenate([view, view])
    p0 = np.concatenate([r0, t0, np.concatenate([np.concatenate(pv) for pv in pose1])])
    p = least_squares(residual, p0, jac=lambda q: block_jacobian(residual, q, 6, view_of_row),
                      method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15, x_scale="jac",
                      max_nfev=100 * len(p0)).x
    err = residual(p)
    rms = float(np.sqrt((err ** 2).sum() / (len(err) // 2)))  # per observed point, 2 cameras
    R, T = Rotation.from_rotvec(p[:3]).as_matrix(), p[3:6].copy()
    E = skew(T) @ R
    F = np.linalg.inv(K2).T @ E @ np.linalg.inv(K1)
    return StereoResult(rms, K1, dist1, K2, dist2, R, T, E, F / F[2, 2])


def chain_extrinsics(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray,
                                                                                np.ndarray]]:
    """Every camera's pose in camera 0's frame from the chain of pairs ``(k−1 → k)``.

    Args:
        pairs: ``[(R_01, T_01), (R_12, T_12), …]`` with ``x_k = R x_{k−1} + T``.

    Returns:
        ``[(I, 0), (R_01, T_01), (R_02, T_02), …]``: ``x_k = R_0k x_0 + T_0k`` where
        ``R_0k = R_{k−1,k} R_0,k−1`` and ``T_0k = R_{k−1,k} T_0,k−1 + T_{k−1,k}``.

    Raises:
        ValueError: a rotation that is not ``[3, 3]`` orthonormal or a translation not ``[3]``.
    """
    out = [(np.eye(3), np.zeros(3))]
    for i, (r, t) in enumerate(pairs):
        r, t = np.asarray(r, float), np.asarray(t, float).ravel()
        if r.shape != (3, 3) or not np.allclose(r @ r.T, np.eye(3), atol=1e-6):
            raise ValueError(f"pairs[{i}] rotation must be an orthonormal [3, 3] matrix, got "
                             f"shape {r.shape}")
        if t.shape != (3,):
            raise ValueError(f"pairs[{i}] translation must have 3 entries, got {t.shape}")
        r_prev, t_prev = out[-1]
        out.append((r @ r_prev, r @ t_prev + t))
    return out
