"""Registration (``align="auto"``): each image of a posed object brought to its part's frame before embedding.

A part that lies at any pose and fills a small share of the frame gives a few-shot bank two problems:
orientations its few shots never showed, and tiny defects at the working resolution. From the support's
foreground estimate (``methods/components/foreground.py``, fitted on the stored features of the support alone) each
image's foreground mask gives its part's centre, principal axis and extent; the image is rotated so the
axis is vertical and cropped to a square around the part with a margin (``pose_of``), then embedded again
at the working shape, so the part fills the input at the same cost (zoom) in one orientation (pose).
Anomaly maps are warped back to the original frame (``to_original``), so pixel metrics compare with
unaligned runs. Near-round parts (no clear axis) are only centred and cropped. Textures are left alone.

``align="always"`` aligns every part. ``align="auto"`` decides from the support's poses alone
(``pose_reason``): only an elongated part (``ELONGATED``) whose pose varies gains from registration; a round
part has no axis (centring and cropping it only adds scale noise between images), and a part in a fixed
pose must stay unaligned, since its pose or place is itself what a test image may get wrong (a misplaced
or turned component). Two or more shots show the pose varying when their axes spread over more than
``POSE_SPREAD``; one shot cannot, so a single part tilted off both image axes by more than ``TILT`` is
taken as posed and an upright one as fixed.

The axis has no sign: a part can arrive upside down, so aligned supports keep their half turn and flips
as augmented views. Poses are rounded (``ANGLE_STEP``, ``GRID_STEP``) so an image aligned twice gets the
same crop.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from fewshot_core.backbones.preprocess import to_uint8_tensor
from fewshot_core.episode_cache import AlignedKey, EpisodeCache
from fewshot_core.errors import FsadError
from fewshot_core.evaluation.augment import embed_images, working_image
from fewshot_core.methods.components.foreground import Foreground, fit_foreground

MARGIN = 0.2  # the crop's half side: the part's largest half extent times 1 + MARGIN
ROUND_PART = 1.3  # principal variances closer than this ratio: no axis, centre and crop only
ANGLE_STEP = 2.0  # degrees
GRID_STEP = 1 / 64  # of the working side, for the centre and the half side
MIN_HALF = 0.15  # of the working side: a tiny mask does not zoom in further than this
ELONGATED = 2.0  # principal variance ratio from which align="auto" sees an axis worth turning to
POSE_SPREAD = 10.0  # degrees: support axes further than this from their mean axis show a varying pose
TILT = 5.0  # degrees off the nearest image axis: one support part lying this tilted is taken as posed


@dataclass(frozen=True)
class Pose:
    """Where an image's part is, in working-image pixels: centre, axis angle (degrees from the x axis)
    and the half side of its square crop; a round part has no axis (``has_axis``: only centred and
    cropped, never turned; an elongated part lying at 0 degrees is still turned upright)."""

    cx: float
    cy: float
    angle: float
    half: float
    elongation: float = 1.0  # principal variance ratio of the mask (not part of the crop's key)
    has_axis: bool = True

    def key(self) -> str:
        return f"{self.cx:.2f},{self.cy:.2f},{self.angle:.1f}{'' if self.has_axis else 'r'},{self.half:.2f}"


def _snap(value: float, step: float) -> float:
    return round(value / step) * step


def pose_of(mask: np.ndarray, shape: tuple[int, int]) -> Pose:
    """The pose of a part from its foreground ``mask`` [h, w] on the patch grid of a (height, width) image."""
    height, width = shape
    gh, gw = mask.shape
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return Pose(width / 2, height / 2, 0.0, max(width, height) / 2, has_axis=False)
    px, py = (xs + 0.5) * width / gw, (ys + 0.5) * height / gh
    cx, cy = float(px.mean()), float(py.mean())
    cov = np.cov(np.stack([px - cx, py - cy])) if len(px) > 1 else np.eye(2)
    evals, evecs = np.linalg.eigh(cov)
    elongation = float(evals[1] / max(evals[0], 1e-9))
    has_axis = bool(evals[1] > ROUND_PART * max(evals[0], 1e-9))
    if has_axis:
        u = evecs[:, 1]
        proj = (px - cx) * u[0] + (py - cy) * u[1]
        # point the axis at the heavier end (the mass sits where the skew's long tail is not), so an
        # asymmetric part gets one orientation whichever way it lay
        if float(np.mean(proj ** 3)) > 0:
            u = -u
        angle = _snap(math.degrees(math.atan2(u[1], u[0])), ANGLE_STEP)
    else:
        angle = 0.0
    u = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
    v = np.array([-u[1], u[0]])
    cell = max(width / gw, height / gh)
    extent = max(np.abs((px - cx) * u[0] + (py - cy) * u[1]).max(), np.abs((px - cx) * v[0] + (py - cy) * v[1]).max())
    side = min(width, height)
    half = max((extent + cell) * (1 + MARGIN), MIN_HALF * side)
    step = GRID_STEP * side
    return Pose(_snap(cx, step), _snap(cy, step), angle if angle != 0.0 else 0.0, _snap(half, step),
                round(elongation, 3), has_axis)


def _axis_offsets(angles: np.ndarray) -> np.ndarray:
    """Each undirected axis's distance in degrees from the support's mean axis (axes averaged as doubled
    angles, so 1 and 179 degrees are 2 apart)."""
    doubled = np.radians(2 * angles)
    mean = math.atan2(np.sin(doubled).mean(), np.cos(doubled).mean())
    return np.degrees(np.abs(np.angle(np.exp(1j * (doubled - mean))))) / 2


def pose_reason(support_poses: list[Pose]) -> str | None:
    """Why ``align="auto"`` leaves this support's category unaligned, or None to align it (module docstring)."""
    elongated = [p for p in support_poses if p.elongation >= ELONGATED]
    if 2 * len(elongated) <= len(support_poses):
        return "round part: not aligned"
    angles = np.array([p.angle for p in elongated])
    if len(elongated) == 1:
        tilt = float(np.abs((angles[0] + 45) % 90 - 45))
        return None if tilt > TILT else "fixed pose: not aligned"
    return None if _axis_offsets(angles).max() > POSE_SPREAD else "fixed pose: not aligned"


def _frame(pose: Pose, out_shape: tuple[int, int]):
    """(scale, u, v, output centre): input = centre + scale * (v * (ox - ocx) + u * (oy - ocy)), so the
    part's axis ``u`` runs down the output's vertical."""
    oh, ow = out_shape
    scale = pose.half / (min(oh, ow) / 2)
    if not pose.has_axis:  # a round part: no rotation, only centre and crop
        u, v = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    else:
        a = math.radians(pose.angle)
        u = np.array([math.cos(a), math.sin(a)])
        v = np.array([-u[1], u[0]])
    return scale, u, v, (ow / 2, oh / 2)


def aligned_image(image: Image.Image, pose: Pose, out_shape: tuple[int, int]) -> Image.Image:
    """``image`` (at the working shape) rotated and cropped to ``pose``, at ``out_shape`` (height, width);
    outside the image is filled with its mean colour, not black, so the fill is not an edge."""
    scale, u, v, (ocx, ocy) = _frame(pose, out_shape)
    coeffs = (scale * v[0], scale * u[0], pose.cx - scale * (v[0] * ocx + u[0] * ocy),
              scale * v[1], scale * u[1], pose.cy - scale * (v[1] * ocx + u[1] * ocy))
    rgb = image.convert("RGB")
    fill = tuple(int(c) for c in np.asarray(rgb).reshape(-1, 3).mean(0))
    return rgb.transform((out_shape[1], out_shape[0]), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR,
                         fillcolor=fill)


def to_original(maps: np.ndarray, poses: list[Pose], working: tuple[int, int], out: tuple[int, int]) -> np.ndarray:
    """Aligned maps [m, H, W] -> maps [m, oh, ow] in each image's original frame: ``working`` is the
    (height, width) of the frame the poses are in (the working image), ``out`` the resolution wanted for
    it; outside the crop each map takes its minimum."""
    oh, ow = out
    wh, ww = working
    qy, qx = np.meshgrid((np.arange(oh) + 0.5) * wh / oh, (np.arange(ow) + 0.5) * ww / ow, indexing="ij")
    res = np.empty((len(maps), oh, ow), dtype=np.float32)
    for i, (amap, pose) in enumerate(zip(maps, poses)):
        scale, u, v, (ocx, ocy) = _frame(pose, amap.shape)
        dx, dy = (qx - pose.cx) / scale, (qy - pose.cy) / scale
        ox, oy = ocx + v[0] * dx + v[1] * dy, ocy + u[0] * dx + u[1] * dy
        res[i] = ndimage.map_coordinates(amap, [oy - 0.5, ox - 0.5], order=1, mode="constant",
                                         cval=float(amap.min()))
    return res


class AlignedPartition:
    """A feature partition seen through per-image poses: ``patch(ids)`` embeds each image aligned (once per
    image and pose, kept in ``cache``); everything else is the store partition's. Its augmented views are
    views of the aligned images and are never written to the store's folder (``persist_views``)."""

    persist_views = False

    def __init__(self, partition, dataset, poses: dict[str, Pose], cache: EpisodeCache,
                 foreground: Foreground | None = None):
        self._partition, self._dataset, self.poses, self._cache = partition, dataset, poses, cache
        self.foreground = foreground  # the estimate whose masks gave the poses (a deployed model's too)
        digest = hashlib.sha256("|".join(f"{i}:{p.key()}" for i, p in sorted(poses.items())).encode())
        self.meta = {**partition.meta, "key": f"{partition.meta['key']}-aligned-{digest.hexdigest()[:12]}"}

    def __getattr__(self, name):  # grid, input_shape, path, patch_dim, ...: the store partition's
        return getattr(self._partition, name)

    @property
    def key(self) -> str:
        return self.meta["key"]

    def transforms(self, support_ids, default) -> tuple[str, ...]:
        """The support's augmented views: the half turn and flips once its parts stand upright; the
        ``default`` (quarter turns too) while most are round, so only centred and never turned."""
        upright = sum(self.poses[i].has_axis for i in support_ids)
        return ALIGNED_TRANSFORMS if 2 * upright > len(support_ids) else tuple(default)

    def image(self, image_id: str) -> Image.Image:
        """The aligned image ``image_id`` at the working shape (what ``patch`` embeds)."""
        base = working_image(self._partition, self._dataset.by_id(image_id).path, self._cache)
        return aligned_image(base, self.poses[image_id], self._partition.input_shape)

    def patch(self, ids) -> np.ndarray:
        ids = list(ids)
        keys = {i: AlignedKey(self._partition.meta["key"], i, self.poses[i].key()) for i in ids}
        todo = [i for i in ids if keys[i] not in self._cache]
        if todo:
            for i, f in zip(todo, embed_images(self._partition, [self.image(i) for i in todo], self._cache)):
                self._cache[keys[i]] = f
        return np.stack([self._cache[keys[i]] for i in ids])


def foreground_record(foreground: Foreground) -> dict:
    """The part of a foreground estimate that poses need (``Foreground.mask``), as plain JSON for a
    deployed model's record: nothing in it is executed or unpickled when it is read back."""
    return {"mean": foreground.mean_.tolist(), "direction": foreground.direction_.tolist(),
            "threshold": float(foreground.threshold_)}


def foreground_from_record(record: dict) -> Foreground:
    return Foreground.from_state({"fg_mean": np.asarray(record["mean"], np.float32),
                                  "fg_direction": np.asarray(record["direction"], np.float32),
                                  "fg_threshold": np.asarray([record["threshold"]], np.float32),
                                  "fg_is_object": np.asarray([True])})


def align_pixels(pixels, patch: np.ndarray, foreground: Foreground, shape: tuple[int, int]):
    """A deployed model's images brought to their parts' frames as ``align_episode`` brought the
    evaluation's: ``pixels`` uint8 [n, 3, H, W] at the working ``shape``, ``patch`` their features.
    Returns (aligned uint8 pixels [n, 3, H, W], poses)."""
    poses = [pose_of(m, shape) for m in foreground.mask(patch)]
    images = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    return torch.stack([to_uint8_tensor(aligned_image(img, pose, shape)) for img, pose in zip(images, poses)]), poses


ALIGNS = ("none", "auto", "always")
# an aligned part stands upright, heavier end first: the sign of its axis can still flip, and a part can
# lie face down, so its views are the half turn and the flips; a quarter turn is a pose that never occurs
ALIGNED_TRANSFORMS = ("hflip", "vflip", "rot180")


def check_align(align: str) -> str:
    if align not in ALIGNS:
        raise FsadError(f"align {align!r}: unknown; use one of {', '.join(ALIGNS)}")
    return align


def align_episode(dataset, partition, support_ids, query_ids, seed: int, cache: EpisodeCache,
                  align: str = "always") -> tuple[AlignedPartition | None, str]:
    """The ``AlignedPartition`` of an episode and the row's ``align`` value: its poses from a foreground
    estimate fitted on the support's stored features alone. None with the reason when the support is a
    texture (nothing to align) or, under ``align="auto"``, when ``pose_reason`` keeps the part as it is."""
    support = partition.patch(list(support_ids))
    foreground = fit_foreground(support, "auto", seed)
    if not foreground.is_object_:
        return None, "texture: not aligned"
    poses = {i: pose_of(m, partition.input_shape) for i, m in zip(support_ids, foreground.mask(support))}
    if align == "auto" and (reason := pose_reason(list(poses.values()))) is not None:
        return None, reason
    queries = [i for i in dict.fromkeys(query_ids) if i not in poses]
    if queries:  # each image's mask is its own: the support's poses stand
        poses.update(zip(queries, (pose_of(m, partition.input_shape)
                                   for m in foreground.mask(partition.patch(queries)))))
    return AlignedPartition(partition, dataset, poses, cache, foreground), "aligned"
