"""Video metrics of an export: prediction and reference of each clip rendered once, by the same renderer and
camera, and the frames fed to consumers -- the FID Inception's features for FID/KID here, SyncNet's mouth
crops (``avi_jax.metrics.lip_sync``) through the same :class:`FrameConsumer` interface.

Rendering (:mod:`avi_jax.render`): FLAME vertices of the neutral identity with the head at rest (the
reference from its coefficients, the prediction from its coefficients or its own vertices; both cut to the
shorter length), shaded by one :class:`MeshRenderer` at ``size`` x ``size`` pixels through one fixed frontal
camera for every clip and both sides: :meth:`Camera.framing` of the template's FLAME ``face`` region (the
whole template when the masks have no ``face``) with a margin of 1.3 so that an open jaw stays in view. So
FID/KID compare renders of the face region in which only the motion differs, as the paper's Table 1 does
for its renders (the paper does not give its renderer or framing; these are ours).

FID/KID (:mod:`avi_jax.metrics.image_quality`): pool3 features of the FID Inception (pytorch-fid's
network and weights, :mod:`avi_jax.models.inception`) of every ``fid_stride``-th frame of each side, computed
in fixed-size jitted batches; FID and KID of the prediction frames against the reference frames. A
``fid_stride`` above 1 subsamples frames for speed (neighbouring frames at 25 fps are nearly identical, so
the statistics change little; the stride is reported). Without the weights file both are reported as
unavailable, naming the file and where users get it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from avi_jax.errors import InputError
from avi_jax.metrics import image_quality
from avi_jax.metrics.evaluate_motion import MM, Clip, flame_vertices_mm

RENDER_SIZE = 256
FRAMING_MARGIN = 1.3
CHUNK = 32          # frames rendered and handed to the consumers at once
SIDES = ("prediction", "reference")
VARIANTS = {
    "fid": "FID (pytorch-fid: Frechet distance of Gaussian fits to the FID Inception's 2048-d pool3 features, "
           "inputs resized to 299x299 bilinear) of prediction vs reference renders of the face region",
    "kid": "KID (clean-fid / torchmetrics estimator: unbiased MMD^2, kernel (x.y/2048 + 1)^3, mean over random "
           "subsets; sizes in counts) of the same features",
}


@dataclasses.dataclass(frozen=True)
class FrameBatch:
    """Consecutive rendered frames of one side of one clip.

    Attributes:
      clip_id: the clip.
      side: ``"prediction"`` or ``"reference"``.
      index: (n,) int64 frame indices in the clip (25 fps; every frame some consumer asked for).
      frames: (n, H, W, 3) uint8 RGB renders, rows top to bottom.
      vertices: (n, V, 3) float32 FLAME vertices in metres that were drawn.
      camera: the :class:`avi_jax.render.Camera` (the same for both sides and every clip).
      num_frames: the clip's length after cutting prediction and reference to the shorter one.
    """
    clip_id: str
    side: str
    index: np.ndarray
    frames: np.ndarray
    vertices: np.ndarray
    camera: Any
    num_frames: int


class FrameConsumer(Protocol):
    """Takes rendered frames (every ``stride``-th frame of each clip and side, in order) and returns a report
    section ``{"metrics", "variants", "counts", "unavailable"}`` at the end."""
    stride: int

    def consume(self, batch: FrameBatch) -> None: ...

    def result(self) -> dict[str, Any]: ...


class InceptionFeatures:
    """Consumer computing FID Inception pool3 features of both sides' frames, then FID and KID.

    Args:
      variables: FID Inception variables (``avi_jax.checkpoints.inception.load_inception``).
      stride: use every ``stride``-th frame of each clip (1: all frames).
      batch_size: frames per jitted call (the last batch is padded, so one shape compiles).
      kid_subsets, kid_subset_size, seed: KID's subsets (``image_quality.kid``).
    """

    def __init__(self, variables: Any, *, stride: int = 1, batch_size: int = 32,
                 kid_subsets: int = image_quality.KID_SUBSETS,
                 kid_subset_size: int = image_quality.KID_SUBSET_SIZE, seed: int = 0):
        import jax
        import jax.numpy as jnp
        from avi_jax.models.inception import FIDInceptionV3

        if stride < 1 or batch_size < 1:
            raise InputError(f"InceptionFeatures: stride {stride} and batch_size {batch_size} must be >= 1")
        model = FIDInceptionV3()
        self.stride, self.batch_size = stride, batch_size
        self.kid_subsets, self.kid_subset_size, self.seed = kid_subsets, kid_subset_size, seed
        self._variables = jax.device_put(variables)
        self._apply = jax.jit(lambda v, x: model.apply(v, x.astype(jnp.float32) / 255.0))
        self._pending: dict[str, list[np.ndarray]] = {s: [] for s in SIDES}
        self._features: dict[str, list[np.ndarray]] = {s: [] for s in SIDES}

    def consume(self, batch: FrameBatch) -> None:
        self._pending[batch.side].append(batch.frames)
        self._run(batch.side, final=False)

    def _run(self, side: str, final: bool) -> None:
        pending = self._pending[side]
        total = sum(len(f) for f in pending)
        if total == 0 or (total < self.batch_size and not final):
            return
        frames = np.concatenate(pending)
        n_full = len(frames) // self.batch_size * self.batch_size
        done = n_full if not final else len(frames)
        for start in range(0, done, self.batch_size):
            chunk = frames[start:start + self.batch_size]
            padded = np.zeros((self.batch_size,) + chunk.shape[1:], np.uint8)
            padded[:len(chunk)] = chunk
            self._features[side].append(np.asarray(self._apply(self._variables, padded))[:len(chunk)])
        self._pending[side] = [frames[done:]] if done < len(frames) else []

    def features(self, side: str) -> np.ndarray:
        """(N, 2048) float32 features of all frames of ``side`` consumed so far."""
        self._run(side, final=True)
        return np.concatenate(self._features[side]) if self._features[side] else np.zeros((0, 2048), np.float32)

    def result(self) -> dict[str, Any]:
        pred, ref = self.features("prediction"), self.features("reference")
        counts = {"fid_frames_prediction": len(pred), "fid_frames_reference": len(ref),
                  "fid_frame_stride": self.stride}
        if min(len(pred), len(ref)) < 2:
            reason = f"needs >= 2 frames per side, got {len(pred)} predicted and {len(ref)} reference frames"
            return {"metrics": {}, "variants": {}, "counts": counts, "unavailable": {"fid": reason, "kid": reason}}
        k = image_quality.kid(pred, ref, num_subsets=self.kid_subsets, max_subset_size=self.kid_subset_size,
                              seed=self.seed)
        counts.update(kid_subset_size=k["subset_size"], kid_subsets=k["num_subsets"])
        return {"metrics": {"fid": image_quality.fid(pred, ref), "kid": k["kid"], "kid_std": k["kid_std"]},
                "variants": {"fid": VARIANTS["fid"], "kid": VARIANTS["kid"],
                             "kid_std": "standard deviation of KID over its subsets"},
                "counts": counts, "unavailable": {}}


def face_camera(flame: Any) -> Any:
    """The fixed frontal :class:`Camera` framing the template's ``face`` region (module docstring)."""
    from avi_jax.render import Camera
    template = np.asarray(flame.v_template, np.float64)
    region = template[np.asarray(flame.masks["face"])] if "face" in flame.masks else template
    return Camera.framing(region, aspect=1.0, margin=FRAMING_MARGIN)


def _clip_vertices(flame: Any, clips: Sequence[Clip]) -> Iterable[tuple[Clip, int, np.ndarray, np.ndarray]]:
    """``(clip, T, prediction (T, V, 3), reference (T, V, 3))`` float32 metres per clip, sample 0, both cut to
    the shorter length; FLAME evaluated in jitted batches (``flame_vertices_mm``)."""
    lengths = [min(c.samples[0].num_frames, len(c.gt)) for c in clips]
    refs = flame_vertices_mm(flame, [c.gt[:t].astype(np.float32) for c, t in zip(clips, lengths)])
    preds = flame_vertices_mm(flame, [c.samples[0].motion[:t] if c.samples[0].vertices is None else None
                                      for c, t in zip(clips, lengths)])
    for clip, t, ref, pred in zip(clips, lengths, refs, preds):
        pred = np.asarray(clip.samples[0].vertices[:t], np.float32) if pred is None else pred / np.float32(MM)
        if pred.shape[1] != ref.shape[1]:
            raise InputError(f"{clip.samples[0].path}: vertices have {pred.shape[1]} vertices, the FLAME model "
                             f"{ref.shape[1]}")
        yield clip, t, pred, ref / np.float32(MM)


def render_clips(clips: Sequence[Clip], flame: Any, consumers: Sequence[FrameConsumer], *,
                 size: int = RENDER_SIZE, progress: bool = True) -> dict[str, Any]:
    """Render both sides of every clip once and hand each consumer its frames (module docstring).

    Frames rendered: every ``min(stride)``-th frame of each clip; a consumer receives the frames whose index
    is a multiple of its own ``stride``. Returns counts and timings: ``clips``, ``frames`` (per side, of the
    cut clips), ``frames_rendered`` (both sides), ``render_size``, ``seconds`` and ``seconds_per_clip`` (wall
    time of the rendering together with the consumers' work on the frames).

    Raises:
      RenderError: no headless OpenGL (EGL) here. InputError: bad vertices (naming the file).
    """
    from tqdm import tqdm
    from avi_jax.render import MeshRenderer

    step = min(c.stride for c in consumers)
    camera = face_camera(flame)
    start, frames, rendered = time.perf_counter(), 0, 0
    with MeshRenderer(np.asarray(flame.faces), size=size, camera=camera) as renderer:
        for clip, t, pred, ref in tqdm(_clip_vertices(flame, clips), total=len(clips), desc="render",
                                       unit="clip", disable=not progress, leave=False):
            frames += t
            wanted = np.arange(0, t, step)
            for side, verts in zip(SIDES, (pred, ref)):
                for lo in range(0, len(wanted), CHUNK):
                    index = wanted[lo:lo + CHUNK]
                    drawn = renderer.render(verts[index])
                    rendered += len(index)
                    for consumer in consumers:
                        keep = index % consumer.stride == 0
                        if keep.any():
                            consumer.consume(FrameBatch(clip.clip_id, side, index[keep], drawn[keep],
                                                        verts[index[keep]], camera, t))
    seconds = time.perf_counter() - start
    return {"clips": len(clips), "frames": frames, "frames_rendered": rendered, "render_size": size,
            "seconds": round(seconds, 3), "seconds_per_clip": round(seconds / max(len(clips), 1), 3)}


def evaluate_video(clips: Sequence[Clip], flame: Any, *, inception_weights: str | None = None,
                   consumers: Sequence[FrameConsumer] = (), size: int = RENDER_SIZE, fid_stride: int = 1,
                   batch_size: int = 32, progress: bool = True) -> dict[str, Any]:
    """The video section: FID/KID (with ``inception_weights``) and any other ``consumers``' metrics.

    Args:
      clips: matched clips (``evaluate_motion.match_clips(...)["clips"]``); sample 0 of each is rendered.
      flame: the FLAME model (``avi_jax.checkpoints.flame.load_flame_model``) that makes the vertices.
      inception_weights: path of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``, or None.
      consumers: further :class:`FrameConsumer` s (SyncNet) fed from the same renders.
      size: render size in pixels (square).
      fid_stride: every ``fid_stride``-th frame of each clip goes to the Inception (1: all).
      batch_size: Inception frames per jitted call.

    Returns:
      ``{"metrics", "variants", "counts", "unavailable": {name: reason}}``: the consumers' sections merged;
      counts add the render counts and timings of :func:`render_clips`.

    Raises:
      CheckpointError: the Inception weights file is unreadable or is another network's.
      RenderError, InputError: as :func:`render_clips`.
    """
    from avi_jax.checkpoints.inception import load_inception, missing_weights_reason

    consumers = list(consumers)
    unavailable: dict[str, str] = {}
    if inception_weights and os.path.isfile(inception_weights):
        consumers.append(InceptionFeatures(load_inception(inception_weights), stride=fid_stride,
                                           batch_size=batch_size))
    else:
        unavailable["fid"] = unavailable["kid"] = missing_weights_reason(inception_weights)
    out: dict[str, Any] = {"metrics": {}, "variants": {}, "counts": {}, "unavailable": unavailable}
    if not consumers or not clips:
        return out
    out["counts"].update(render_clips(clips, flame, consumers, size=size, progress=progress))
    for consumer in consumers:
        section = consumer.result()
        for key in ("metrics", "variants", "counts", "unavailable"):
            out[key].update(section.get(key, {}))
    for name in out["metrics"]:        # a consumer given by the caller computed it after all
        unavailable.pop(name, None)
    return out


__all__ = ["FrameBatch", "FrameConsumer", "InceptionFeatures", "VARIANTS", "evaluate_video", "face_camera",
           "render_clips"]
