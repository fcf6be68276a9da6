"""Stage 2a training (paper Sec. III-D): the motion prior, ``stage=motion``.

``MotionSetup`` (``avi_jax.assembly.motion``) gathers what the stage (and later the style stage and
inference) needs: the prepared data, the training-set motion statistics, the ``MotionPrior`` model and,
when configured, FLAME. ``MotionStage`` states components, loss and evaluation and hands itself to the
shared loop.

Keeping the predicted frames out of the style encoder (the "content-irrelevant" space must not see the
motion it is asked to produce):

* training — ``split_target``: per clip, a random contiguous *target* segment of
  ``round(target_fraction * n)`` of its n valid frames is predicted; the style encoder sees the clip's
  other valid frames except ``exclusion_margin`` frames on either side of the segment (neighbouring
  frames are nearly copies of the boundary frames). The reconstruction, velocity and vertex losses are
  taken on the target frames only; the generator still runs over the whole clip (its audio context).
* evaluation — ``heldout_halves``: each clip is predicted twice, first half with the style of the second
  half (minus the margin), then the other way round, so every valid frame is predicted by a model whose
  style encoder never saw it.

Losses (per target frame, over the global batch): coefficient reconstruction (L1 or MSE, on motion
normalised by the training statistics, i.e. per-coefficient errors in standard deviations; expression and
jaw averaged separately and weighted), a velocity term (the same on first differences over consecutive
target frames) and, with ``config.flame.model_path``, a vertex term (mean squared vertex distance in mm²
over all vertices plus ``lip_weight`` times the same over the lip region).

Style distillation (paper Sec. IV-A-2, after EMOTE's linear styling network), with ``motion.distill.weight``
w > 0: the ``style_teacher`` (``models.motion.StylingTeacher``: one-hot emotion ++ one-hot intensity ->
linear -> style embedding) is trained in the same stage as EMOTE trains its styling code, i.e. the generator
also reconstructs the target frames from the teacher's embedding (``teacher_loss``, the same terms), and
the style encoder's embedding of the reference frames is pulled towards the teacher's by
``w * distill`` (``distillation_loss``; clips without an emotion label are left out of both). With
``motion.distill.teacher_path`` the teacher is a user's trained one, loaded frozen (no teacher_loss).
w = 0: no teacher, no term.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avi_jax import sharding as mesh_lib
from avi_jax.assembly.common import INIT
from avi_jax.assembly.motion import STAGE, TEACHER, MotionSetup, distill_weight, target_motion
from avi_jax.data import schema
from avi_jax.errors import ConfigError
from avi_jax.metrics.correlation import pearson
from avi_jax.metrics.lip_vertex_error import lip_vertex_error
from avi_jax.models.flame import motion_to_vertices
from avi_jax.models.motion import JAW_OPEN, MotionPrior
from avi_jax.training.stage import Stage

MM = 1000.0   # metres -> millimetres


# ---------------------------------------------------------------------------------------------
# Pure functions: targets, reference masks, losses.
# ---------------------------------------------------------------------------------------------

def split_target(rng: jax.Array, mask: jax.Array, fraction: float, margin: int
                 ) -> tuple[jax.Array, jax.Array]:
    """Training split of each clip's valid frames into a target segment and style references.

    Args:
      rng: PRNG key.
      mask: (B, F) bool valid frames; assumed a prefix of the clip (the pipeline's right padding).
      fraction: target length as a fraction of the n valid frames, ``L = clip(round(fraction n), 1, n)``.
      margin: frames on each side of the target that are excluded from the references too.

    Returns:
      target (B, F) bool: frames ``[s, s + L)`` with s uniform in ``[0, n - L]``;
      reference (B, F) bool: valid frames outside ``[s - margin, s + L + margin)``. Disjoint from target.
    """
    b, f = mask.shape
    n = jnp.sum(mask, axis=-1)
    length = jnp.clip(jnp.round(fraction * n).astype(jnp.int32), 1, jnp.maximum(n, 1))
    start = jnp.floor(jax.random.uniform(rng, (b,)) * (n - length + 1)).astype(jnp.int32)
    start = jnp.clip(start, 0, jnp.maximum(n - length, 0))
    idx = jnp.arange(f)[None, :]
    s, e = start[:, None], (start + length)[:, None]
    target = mask & (idx >= s) & (idx < e)
    reference = mask & ((idx < s - margin) | (idx >= e + margin))
    return target, reference


def heldout_halves(mask: jax.Array, margin: int) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Evaluation split: ((target_a, reference_a), (target_b, reference_b)), each (B, F) bool.

    a = the first ``n // 2`` valid frames (references: valid frames from ``n // 2 + margin`` on),
    b = the rest (references: valid frames before ``n // 2 - margin``). target_a | target_b = mask.
    """
    n = jnp.sum(mask, axis=-1, keepdims=True)
    idx = jnp.arange(mask.shape[1])[None, :]
    half = n // 2
    first = mask & (idx < half)
    second = mask & (idx >= half)
    return ((first, mask & (idx >= half + margin)), (second, mask & (idx < half - margin)))


def _error(diff: jax.Array, kind: str) -> jax.Array:
    if kind == "l1":
        return jnp.abs(diff)
    if kind == "mse":
        return jnp.square(diff)
    raise ConfigError(f"loss kind must be 'l1' or 'mse', got {kind!r}")


def coefficient_losses(pred: jax.Array, target: jax.Array, mask: jax.Array, scale: jax.Array, *,
                       kind: str = "l1", exp_weight: float = 1.0, jaw_weight: float = 1.0
                       ) -> dict[str, jax.Array]:
    """Reconstruction and velocity terms on normalised motion.

    Args:
      pred, target: (B, F, 53) raw motion (50 expression + 3 jaw, radians).
      mask: (B, F) bool frames that count.
      scale: (53,) per-coefficient normalisation (training standard deviation); errors are taken on
        ``(pred - target) / scale``.
      kind: 'l1' (mean absolute) or 'mse' (mean squared).
      exp_weight, jaw_weight: weights of the expression and jaw means.

    Returns:
      ``expression``: mean error over masked frames and the 50 expression coefficients; ``jaw``: the same
      over the 3 jaw coefficients; ``reconstruction = exp_weight * expression + jaw_weight * jaw``;
      ``velocity``: the same weighted error of ``d[t] - d[t-1]`` over pairs of consecutive masked frames.
      Scalars float32; a term with no frames is 0.
    """
    ne = schema.N_EXPRESSION
    d = (pred - target) / scale

    def weighted(err, m):
        m = m.astype(err.dtype)[..., None]
        count = jnp.maximum(jnp.sum(m), 1.0)
        exp = jnp.sum(err[..., :ne] * m) / (count * ne)
        jaw = jnp.sum(err[..., ne:] * m) / (count * (err.shape[-1] - ne))
        return exp, jaw

    exp, jaw = weighted(_error(d, kind), mask)
    v_exp, v_jaw = weighted(_error(d[:, 1:] - d[:, :-1], kind), mask[:, 1:] & mask[:, :-1])
    return {"expression": exp, "jaw": jaw, "reconstruction": exp_weight * exp + jaw_weight * jaw,
            "velocity": exp_weight * v_exp + jaw_weight * v_jaw}


def distillation_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array) -> jax.Array:
    """Style distillation (paper Sec. IV-A-2): mean squared error between the style encoder's embeddings
    ``student`` (B, D) and the styling teacher's ``teacher`` (B, D) (gradient stopped: the teacher is not
    pulled towards the student), averaged over dimensions and the rows of ``mask`` (B,) bool (labelled
    clips with target frames). Scalar float32; 0 when no row counts."""
    err = jnp.mean(jnp.square(student - jax.lax.stop_gradient(teacher)), axis=-1)
    m = mask.astype(err.dtype)
    return jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)


def vertex_losses(flame: Any, pred: jax.Array, target: jax.Array, mask: jax.Array,
                  lip_indices: jax.Array | None) -> dict[str, jax.Array]:
    """Mean squared vertex distance (mm²) over masked frames: ``vertex`` over all FLAME vertices and
    ``lip_vertex`` over ``lip_indices`` (0 when None). pred/target (B, F, 53) raw motion, mask (B, F)."""
    sq = jnp.sum(jnp.square((motion_to_vertices(flame, pred) - motion_to_vertices(flame, target)) * MM), -1)
    m = mask.astype(sq.dtype)
    count = jnp.maximum(jnp.sum(m), 1.0)
    out = {"vertex": jnp.sum(jnp.mean(sq, -1) * m) / count}
    out["lip_vertex"] = (jnp.sum(jnp.mean(sq[..., lip_indices], -1) * m) / count
                         if lip_indices is not None else jnp.zeros(()))
    return out


# ---------------------------------------------------------------------------------------------
# The stage.
# ---------------------------------------------------------------------------------------------

class MotionStage(Stage):
    """Stage 2a: style encoder + talking generator (+ content encoder; + Wav2Vec2 when fine-tuned)."""
    name = STAGE

    def __init__(self, setup: MotionSetup):
        super().__init__(setup)
        self.model = setup.model
        self._eval_fn = None

    @property
    def trainable(self) -> tuple[str, ...]:
        extra = ("audio_encoder",) if self.config.model.audio_encoder.finetune else ()
        if self.setup.model_config.style_teacher and self.source(TEACHER) == INIT:
            extra += (TEACHER,)
        return ("content_encoder", "style_encoder", "generator") + extra

    def train_dataset(self):
        return self.setup.dataset(self.config.data.train_split, train=True,
                                  batch_size=int(self.config.motion.batch_size))

    def eval_dataset(self):
        return self.setup.dataset(self.config.data.eval_split, train=False,
                                  batch_size=int(self.config.motion.eval_batch_size))

    def model_init(self, rng, batch):
        return self.setup.init_params(rng, batch)

    def loss(self, params, batch, rng):
        sc = self.config.motion
        split_rng, drop_rng = jax.random.split(rng)
        motion, mask = target_motion(batch)
        target, reference = split_target(split_rng, mask, float(sc.target_fraction), int(sc.exclusion_margin))
        v, rngs = {"params": params}, {"dropout": drop_rng}
        content, frame_mask = self.model.apply(v, batch["audio"], batch["audio_mask"], False, rngs=rngs,
                                               method=MotionPrior.content)
        style = self.model.apply(v, motion, reference, False, rngs=rngs, method=MotionPrior.style)
        loss, terms = self._reconstruction(params, content, frame_mask, style, motion, target, rngs)
        weight = distill_weight(self.config)
        if weight > 0:
            known = (batch["emotion"] >= 0) & target.any(-1)
            teacher = self.model.apply(v, batch["emotion"], batch["intensity"], method=MotionPrior.teacher_style)
            terms["distill"] = distillation_loss(style, teacher, known)
            loss = loss + weight * terms["distill"]
            if TEACHER in self.trainable:     # EMOTE: the teacher is learned as the generator's style code
                t_loss, _ = self._reconstruction(params, content, frame_mask, teacher, motion,
                                                 target & known[:, None],
                                                 {"dropout": jax.random.fold_in(drop_rng, 1)})
                terms["teacher_loss"] = t_loss
                loss = loss + t_loss
        terms["target_frames"] = jnp.sum(target).astype(jnp.float32)
        return loss, terms

    def _reconstruction(self, params, content, frame_mask, style, motion, target, rngs):
        """(loss, terms): the coefficient, velocity and (with FLAME) vertex terms of the motion generated
        from ``content`` and ``style`` on the ``target`` frames."""
        lc = self.config.loss
        pred = self.model.apply({"params": params}, content, frame_mask, style, False, rngs=rngs,
                                method=MotionPrior.generate)
        terms = coefficient_losses(pred, motion, target, params["normalizer"]["scale"], kind=lc.kind,
                                   exp_weight=float(lc.exp_weight), jaw_weight=float(lc.jaw_weight))
        loss = terms["reconstruction"] + float(lc.velocity_weight) * terms["velocity"]
        if self.setup.flame is not None and float(lc.vertex_weight) > 0:
            v = vertex_losses(self.setup.flame, pred, motion, target, self.setup.lip_indices)
            terms.update(v)
            loss = loss + float(lc.vertex_weight) * (v["vertex"] + float(lc.lip_weight) * v["lip_vertex"])
        return loss, terms

    def _predict(self, params, batch):
        """Held-out predictions (B, F, 53): each half of a clip predicted with the other half's style."""
        motion, mask = target_motion(batch)
        content, frame_mask = self.model.apply({"params": params}, batch["audio"], batch["audio_mask"],
                                               method=MotionPrior.content)
        v = {"params": params}
        pred = jnp.zeros_like(motion)
        for target, reference in heldout_halves(mask, int(self.config.motion.exclusion_margin)):
            style = self.model.apply(v, motion, reference, method=MotionPrior.style)
            out = self.model.apply(v, content, frame_mask, style, method=MotionPrior.generate)
            pred = jnp.where(target[..., None], out, pred)
        out = {"pred": pred, "target": motion, "mask": mask}
        if self.setup.flame is not None and self.setup.lip_indices is not None:
            out["lve"] = lip_vertex_error(motion_to_vertices(self.setup.flame, pred) * MM,
                                          motion_to_vertices(self.setup.flame, motion) * MM,
                                          self.setup.lip_indices)
        return out

    def evaluate(self, params, mesh):
        """Held-out metrics over all valid frames of the eval split (``heldout_halves``):

        jaw_correlation (Pearson of predicted vs true jaw opening ``jaw_pose[..., 0]``), coeff_mse (raw
        units, 53 coefficients), expression_mse, jaw_mse, mean_pose_mse (always predicting the training
        mean motion), lve_mm (with FLAME and its masks), num_eval_frames.
        """
        if self._eval_fn is None:
            self._eval_fn = jax.jit(self._predict)
        preds, targets, lves = [], [], []
        for _, batch in self.eval_batches(mesh):
            out = mesh_lib.to_host(self._eval_fn(params, batch))   # all-gathered over processes
            keep = np.asarray(out["mask"])
            preds.append(out["pred"][keep]), targets.append(out["target"][keep])
            if "lve" in out:
                lves.append(out["lve"][keep])
        pred, target = np.concatenate(preds), np.concatenate(targets)
        mean = mesh_lib.to_host(params["normalizer"]["mean"])
        ne = schema.N_EXPRESSION
        err = np.square(pred - target)
        metrics = {
            "jaw_correlation": pearson(pred[:, JAW_OPEN], target[:, JAW_OPEN]),
            "coeff_mse": float(err.mean()),
            "expression_mse": float(err[:, :ne].mean()),
            "jaw_mse": float(err[:, ne:].mean()),
            "mean_pose_mse": float(np.square(mean[None] - target).mean()),
            "num_eval_frames": float(target.shape[0]),
        }
        if lves:
            metrics["lve_mm"] = float(np.concatenate(lves).mean())
        return metrics


STAGES = {"motion": MotionStage}
