"""Calibration: Zhang's method equals cv2.calibrateCamera and our stereo step equals
cv2.stereoCalibrate on the same points (K, distortion, R, T, E, F and RMS within 1e-3
relative); the building blocks equal OpenCV's (projection, undistortion, homography) and are
exact on noise-free data; chaining composes poses; the renderer's boards are found by
OpenCV at their true corners; bad input (fewer than 3 views, parallel boards, …) is refused."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlatlas.datasets.chessboard import Camera, board_points, random_board_poses, render_board
from mlatlas.vision.calibration import (
    CalibrationResult,
    calibrate_camera,
    homography_dlt,
    intrinsics_from_homographies,
    pose_from_homography,
    project_points,
    undistort,
)
from mlatlas.vision.stereo_calibration import chain_extrinsics, stereo_calibrate

K1 = np.array([[803.0, 0, 331.0], [0, 789.0, 243.0], [0, 0, 1]])
D1 = np.array([-0.23, 0.08, 0.0012, -0.0009, -0.01])
K2 = np.array([[771.0, 0, 318.0], [0, 765.0, 251.0], [0, 0, 1]])
D2 = np.array([-0.18, 0.04, -0.0007, 0.0011, 0.0])
OBJ = board_points((8, 5), 30.0)  # 40 corners: not a power of two
RIG = (Rotation.from_rotvec([0.02, -0.12, 0.01]), np.array([-110.0, 4.0, 8.0]))


def _as_f32(points, exact=False):
    """Points OpenCV (float32) and ours (float64) both read exactly: the same points."""
    return points if exact else points.astype(np.float32).astype(np.float64)


def _views(n, seed, noise=0.05, parallel=False):
    rng = np.random.default_rng(seed)
    cam = Camera(K1, D1, (640, 480))
    poses = random_board_poses(n, cam, (8, 5), 30.0, max_tilt_deg=35, distance=(450, 650),
                               seed=seed)
    if parallel:
        poses = [(poses[0][0], t) for _, t in poses]
    im1, im2 = [], []
    for rv, tv in poses:
        im1.append(_as_f32(project_points(OBJ, rv, tv, K1, D1)
                           + rng.normal(0, noise, (len(OBJ), 2)), noise == 0))
        rv2 = (RIG[0] * Rotation.from_rotvec(rv)).as_rotvec()
        im2.append(_as_f32(project_points(OBJ, rv2, RIG[0].apply(tv) + RIG[1], K2, D2)
                           + rng.normal(0, noise, (len(OBJ), 2)), noise == 0))
    return [OBJ] * n, im1, im2


def _f32(views):
    return [v.astype(np.float32) for v in views]


def _rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b)


CRIT = (3, 1000, 1e-15)  # cv2.TERM_CRITERIA_COUNT + EPS: run OpenCV to convergence


@pytest.mark.parametrize("n_views,seed", [(3, 0), (7, 1), (13, 2)])
def test_calibrate_camera_matches_opencv(reference, n_views, seed):
    cv2 = reference("cv2")
    obj, img, _ = _views(n_views, seed)
    ours = calibrate_camera(obj, img, (640, 480))
    rms, K, dist, rvecs, tvecs = cv2.calibrateCamera(_f32(obj), _f32(img), (640, 480), None,
                                                     None, criteria=CRIT)
    assert abs(ours.rms / rms - 1) < 1e-3
    assert _rel(ours.K, K) < 1e-3
    assert _rel(ours.dist, dist.ravel()) < 1e-3
    for r, t, rc, tc in zip(ours.rvecs, ours.tvecs, rvecs, tvecs):
        assert _rel(r, rc.ravel()) < 1e-3 and _rel(t, tc.ravel()) < 1e-3


def test_stereo_calibrate_matches_opencv(reference):
    cv2 = reference("cv2")
    obj, im1, im2 = _views(9, 3)
    ours = stereo_calibrate(obj, im1, im2, K1, D1, K2, D2, (640, 480))
    ref = cv2.stereoCalibrate(_f32(obj), _f32(im1), _f32(im2), K1, D1, K2, D2, (640, 480),
                              flags=cv2.CALIB_FIX_INTRINSIC, criteria=CRIT)
    assert abs(ours.rms / ref[0] - 1) < 1e-3
    for name, ours_m, ref_m in zip(("R", "T", "E", "F"), ours[5:], ref[5:9]):
        assert _rel(ours_m, ref_m.reshape(ours_m.shape)) < 1e-3, name
    assert np.degrees((Rotation.from_matrix(ours.R) * RIG[0].inv()).magnitude()) < 0.05
    assert np.linalg.norm(ours.T - RIG[1]) < 1.0  # mm


def test_noise_free_views_are_recovered_exactly():
    obj, img, _ = _views(5, 4, noise=0.0)
    res = calibrate_camera(obj, img, (640, 480))
    assert isinstance(res, CalibrationResult) and len(tuple(res)) == 5
    rms, K, dist, rvecs, tvecs = res  # unpacks like OpenCV's tuple
    assert rms < 1e-6
    np.testing.assert_allclose(K, K1, rtol=1e-7)
    np.testing.assert_allclose(dist, D1, atol=1e-6)


def test_closed_form_intrinsics_without_distortion():
    cam = Camera(K1, np.zeros(5), (640, 480))
    poses = random_board_poses(4, cam, (8, 5), 30.0, seed=5)
    hs = [homography_dlt(OBJ[:, :2], project_points(OBJ, rv, tv, K1, np.zeros(5)))
          for rv, tv in poses]
    K = intrinsics_from_homographies(hs, (640, 480))
    np.testing.assert_allclose(K, K1, rtol=1e-8, atol=1e-8)
    rv, tv = pose_from_homography(K, hs[0])
    np.testing.assert_allclose(rv, poses[0][0], atol=1e-9)
    np.testing.assert_allclose(tv, poses[0][1], rtol=1e-9)


def test_building_blocks_match_opencv(reference):
    cv2 = reference("cv2")
    rv, tv = np.array([0.2, -0.3, 0.1]), np.array([-60.0, -40.0, 500.0])
    ref, _ = cv2.projectPoints(OBJ, rv, tv, K1, D1)
    np.testing.assert_allclose(project_points(OBJ, rv, tv, K1, D1), ref[:, 0], atol=1e-9)
    und = cv2.undistortPoints(ref, K1, D1, criteria=(3, 100, 1e-14))[:, 0]
    ours = undistort((ref[:, 0] - K1[:2, 2]) / np.diag(K1)[:2], D1, iterations=100)
    np.testing.assert_allclose(ours, und, atol=1e-9)
    pinhole = project_points(OBJ, rv, tv, K1, np.zeros(5))  # an exact homography
    H_ref, _ = cv2.findHomography(OBJ[:, :2], pinhole, 0)  # (OpenCV holds points in float32)
    np.testing.assert_allclose(homography_dlt(OBJ[:, :2], pinhole), H_ref, rtol=1e-5, atol=1e-9)


def test_chain_extrinsics_composes_poses():
    gen = np.random.default_rng(6)
    rots = [Rotation.from_rotvec(gen.normal(0, 0.3, 3)) for _ in range(3)]
    ts = [gen.normal(0, 50, 3) for _ in range(3)]
    x0 = gen.normal(0, 100, (5, 3))
    chain = chain_extrinsics([(r.as_matrix(), t) for r, t in zip(rots, ts)])
    assert len(chain) == 4
    x = x0
    for (r, t), (rc, tc) in zip(zip(rots, ts), chain[1:]):
        x = r.apply(x) + t  # camera by camera
        np.testing.assert_allclose(x0 @ rc.T + tc, x, atol=1e-9)


def test_rendered_boards_are_found_at_their_true_corners(reference):
    cv2 = reference("cv2")
    cam = Camera(np.array([[300.0, 0, 161.0], [0, 296.0, 118.0], [0, 0, 1]]),
                 np.array([-0.2, 0.05, 0.0, 0.0, 0.0]), (330, 250))
    (rv, tv), = random_board_poses(1, cam, (7, 5), 25.0, seed=1)
    img = render_board(cam, rv, tv, (7, 5), 25.0)
    assert img.shape == (250, 330) and img.dtype == np.uint8
    ok, corners = cv2.findChessboardCorners(img, (7, 5))
    assert ok
    corners = cv2.cornerSubPix(img, corners, (5, 5), (-1, -1), (3, 50, 1e-4)).reshape(-1, 2)
    true = project_points(board_points((7, 5), 25.0), rv, tv, cam.K, cam.dist)
    if np.linalg.norm(corners[0] - true[0]) > np.linalg.norm(corners[0] - true[-1]):
        corners = corners[::-1]
    assert np.sqrt(((corners - true) ** 2).sum(1).mean()) < 0.15


def test_bad_input():
    obj, img, im2 = _views(4, 7)
    with pytest.raises(ValueError, match="at least 3 views of the board, got 2"):
        calibrate_camera(obj[:2], img[:2], (640, 480))
    pobj, pimg, _ = _views(4, 8, parallel=True)
    with pytest.raises(ValueError, match="degenerate views"):
        calibrate_camera(pobj, pimg, (640, 480))
    with pytest.raises(ValueError, match="plane Z = 0"):
        calibrate_camera([o + [0, 0, 5.0] for o in obj], img, (640, 480))
    with pytest.raises(ValueError, match=r"image_points\[1\] must have shape \[N >= 4, 2\]"):
        calibrate_camera(obj, [img[0], img[1][:, :1], img[2], img[3]], (640, 480))
    with pytest.raises(ValueError, match="one entry per view each, got 4 and 3"):
        calibrate_camera(obj, img[:3], (640, 480))
    with pytest.raises(ValueError, match="view 0: 40 object points but 39 image points"):
        calibrate_camera(obj, [img[0][:39]] + img[1:], (640, 480))
    with pytest.raises(ValueError, match="image_size must be"):
        calibrate_camera(obj, img, (640.5, 480))
    with pytest.raises(TypeError, match="object_points must be a list"):
        calibrate_camera(np.stack(obj), img, (640, 480))
    with pytest.raises(ValueError, match="NaN"):
        calibrate_camera(obj, [img[0] * np.nan] + img[1:], (640, 480))
    with pytest.raises(ValueError, match="dist2 must hold"):
        stereo_calibrate(obj, img, im2, K1, D1, K2, D2[:4], (640, 480))
    with pytest.raises(ValueError, match="at least 3 views"):
        stereo_calibrate(obj[:2], img[:2], im2[:2], K1, D1, K2, D2, (640, 480))
    with pytest.raises(ValueError, match=r"pairs\[0\] rotation must be an orthonormal"):
        chain_extrinsics([(2 * np.eye(3), np.zeros(3))])
