"""Inference latency per stage of paper Fig. 2 on one clip, next to the paper's A100 figures; peak memory
of a long recording.

Stages, in the order ``python -m avi_jax.infer`` runs them (``avi_jax/inference/``):

1. **instructions** -- ``face.instructions``: audio encoder (HuBERT) -> Q-Former -> soft prompt -> LLaMA
   greedy decoding (``InstructSetup.describe``);
2. **styles** -- ``face.styles``: text encoder -> aligner -> x0 diffusion prior with guidance;
3. **motion** -- ``face.motion``: Wav2Vec2 content features -> talking generator;
4. **FLAME** -- ``outputs.LazyVertices`` over every frame (jitted FLAME, 64 frames a block);
5. **render** -- ``render.MeshRenderer`` frames at ``--render-size`` (512 x 512; Mesa llvmpipe on a CPU);
6. **encode** -- ``render.write_video``: H.264 + AAC mp4 of those frames with the speech.

Stages 1-3 run inside ``pipeline.synthesize`` (windows, length buckets and batches exactly as the CLI does
them) with the face's methods wrapped in timers. Every stage is called once to warm up (its jit compile
included: "first s") and then ``--repeats`` times ("steady s", the median); "compile s" = first - steady
(for rendering: creating the EGL context, shaders and buffers). A check row times ``outputs.write_render``
(stages 4-6 streamed, as the CLI runs them). Real-time factor = steady compute seconds per second of
audio (< 1: faster than real time). The paper (Sec. IV; PyTorch, 80 GB A100) reports about 7.14 s for the
instruction and 43.06 s for the synthesis network "to generate the final video" for 30 s of audio.

Parts:

* **(a) demo** (``--workdir W``, default ``runs/demo``): the trained system of a finished
  ``python -m avi_jax.train --config configs/avi_talking.py:demo`` (or ``:tiny``) run, loaded with
  ``system.TalkingFace``; the run's ``config.inference`` windows/buckets/batch; the demo's stand-in head.
* **(b) paper** (``--paper``, opt-in): paper-size modules with random weights from the configs' ``paper``
  presets (no checkpoint; ``jax.jit(model.init)``): HuBERT-large + BERT-base-sized Q-Former + LLaMA-7B
  (stage 1), CLIP ViT-L/14 text tower + paper aligner/prior with 100 DDPM steps and guidance 3.5, and
  Wav2Vec2-base + the paper motion prior; configs/avi_talking.py:paper windows (10 s, batch 8). LLaMA-7B
  does not fit this machine in float32 (27 GB), and in bfloat16 its products run ~6x slower than in float32
  on XLA:CPU (measured: a 4 x 4096 by 4096 x 11008 product, 121 vs 21 ms), so ``--llm-layers N`` builds
  N of the 32 decoder layers (with the full 32000 x 4096 embedding and LM head), times greedy decoding with N and with 0 layers and extrapolates linearly:
  t(32) = t(0) + 32 (t(N) - t(0)) / N. Decoding never stops early (no EOS id): ``max_new_tokens`` (64)
  tokens per window, an upper bound for a trained model that ends its instruction sooner. FLAME, render and
  encode do not depend on the models' size: with part (a) in the same run its rows are reused (a trained
  model's motion); alone, (b) runs them on its random-weight motion, which deforms the head far more (more
  pixels to fill). Either way on the demo head (5499 vertices; FLAME has 5023), since no FLAME model ships.
* **(c) long** (``--long-minutes M``): writes an M-minute wav (the fixtures of ``--speech-dir`` repeated)
  and runs ``python -m avi_jax.infer --workdir W --audio long.wav --no-render`` under ``/usr/bin/time -v``
  (a fresh ``AVI_JAX_CACHE``: a cold run), reporting peak RSS (the requirement: < 4 GB on a CPU) and wall
  time.

The clip (``--seconds``, 30) is the speech fixtures (``--speech-dir``) concatenated and cut. Usage (the
default, part (a) only, takes a few minutes on 2 cores)::

  python benchmarks/inference.py --workdir /tmp/runs/tiny
  python benchmarks/inference.py --workdir runs/demo --paper --llm-layers 2
  python benchmarks/inference.py --workdir runs/demo --skip-demo --long-minutes 10

Results: ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.dirname(os.path.abspath(__file__))]   # configs/, avi_jax/, backbones.py

from backbones import cpu_model, load_average  # noqa: E402

SAMPLE_RATE = 16000
PAPER = {"instructions": 7.14, "synthesis": 43.06, "audio_s": 30.0}   # paper Sec. IV, A100
TEMPLATE_TOKENS = 24     # (b): instruction template length after BOS + soft prompt (no tokenizer ships)
TEXT_TOKENS = 32         # (b): real tokens of an instruction for the CLIP text tower (of 77)


@dataclasses.dataclass
class Row:
    """One stage of one part (seconds)."""
    part: str
    stage: str
    what: str
    first_s: float | None
    steady_s: float
    compile_s: float | None = None
    summed: bool = True      # counted in the part's total


# --------------------------------------------------------------------------------------------- helpers
def speech_clip(seconds: float, speech_dir: str) -> np.ndarray:
    """The speech fixtures (sorted) concatenated, repeated and cut to ``seconds`` (16 kHz mono float32)."""
    from avi_jax.data.audio import load_audio
    files = sorted(glob.glob(os.path.join(speech_dir, "*.wav")))
    if not files:
        raise SystemExit(f"no .wav files in --speech-dir {speech_dir}")
    pieces = [load_audio(f) for f in files]
    n = int(round(seconds * SAMPLE_RATE))
    total = sum(p.shape[0] for p in pieces)
    return np.concatenate(pieces * math.ceil(n / total))[:n].astype(np.float32)


def repeated(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call s, median of ``repeats`` later calls s, the last result)."""
    times, out = [], None
    for _ in range(1 + repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]), out


class TimedFace:
    """A face whose instructions/styles/motion calls add their seconds to ``seconds[stage]``; a face with
    its own ``seconds`` breakdown (the paper-size one) has it collected after each call."""

    def __init__(self, face: Any):
        self.face, self.seconds = face, collections.defaultdict(float)

    def _run(self, name: str, fn: Callable, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        self.seconds[name] += time.perf_counter() - t0
        for k, v in getattr(self.face, "seconds", {}).items():
            self.seconds[k] += v
        if hasattr(self.face, "seconds"):
            self.face.seconds.clear()
        return out

    def instructions(self, audio, mask):
        return self._run("instructions", self.face.instructions, audio, mask)

    def styles(self, texts, keys, k):
        return self._run("styles", self.face.styles, texts, keys, k)

    def motion(self, audio, mask, style):
        return self._run("motion", self.face.motion, audio, mask, style)

    def reference_style(self, motion):
        return self.face.reference_style(motion)


def model_passes(face: Any, audio: np.ndarray, options: Any, repeats: int) -> tuple[list[dict], Any]:
    """``pipeline.synthesize`` 1 + ``repeats`` times; returns the per-pass stage seconds and the result."""
    from avi_jax.inference import pipeline
    passes, result = [], None
    for i in range(1 + repeats):
        timed = TimedFace(face)
        print(f"  synthesize pass {i + 1}/{1 + repeats}", flush=True)
        result = pipeline.synthesize(timed, [audio], options)[0][0]
        passes.append(dict(timed.seconds))
    return passes, result


def stage_row(part: str, stage: str, what: str, passes: list[dict], key: str | None = None) -> Row:
    key = key or stage
    first, steady = passes[0][key], statistics.median(p[key] for p in passes[1:])
    return Row(part, stage, what, first, steady, max(first - steady, 0.0))


def output_rows(part: str, flame: Any, result: Any, audio: np.ndarray, size: int, repeats: int,
                folder: str) -> list[Row]:
    """FLAME, render, encode (each warm-up + ``repeats``) and the streamed ``write_render`` check."""
    from avi_jax.inference.outputs import LazyVertices, write_render
    from avi_jax.render import MeshRenderer, write_video

    motion = result.motion
    t = motion.shape[0]

    def flame_pass():
        lazy = LazyVertices(flame, motion)
        out = np.empty(lazy.shape, np.float32)
        for s in range(0, t, LazyVertices.chunk):
            out[s:s + LazyVertices.chunk] = lazy[s:s + LazyVertices.chunk]
        return out

    print("  FLAME", flush=True)
    first, steady, verts = repeated(flame_pass, repeats)
    v = verts.shape[1]
    rows = [Row(part, "FLAME", f"LazyVertices, {t} frames x {v} vertices", first, steady,
                max(first - steady, 0.0))]

    print("  render", flush=True)
    t0 = time.perf_counter()
    renderer = MeshRenderer(np.asarray(flame.faces), size=size)
    setup = time.perf_counter() - t0
    frames = np.empty((t, renderer.height, renderer.width, 3), np.uint8)
    with renderer:
        def render_pass():
            for i, f in enumerate(renderer.frames(verts, chunk=32)):
                frames[i] = f
        first, steady, _ = repeated(render_pass, repeats)
        gl = renderer.renderer_name
    sample = frames[::25].astype(np.int16)
    coverage = float(np.mean(np.abs(sample - sample[:, :1, :1]).max(-1) > 8))   # pixels unlike the corner
    rows.append(Row(part, "render", f"MeshRenderer {size}x{size}, {renderer.samples}x MSAA, {gl}; mesh covers "
                    f"{100 * coverage:.0f}% of the pixels",
                    first + setup, steady, max(first + setup - steady, 0.0)))

    print("  encode", flush=True)
    path = os.path.join(folder, f"{part}_encode.mp4")
    first, steady, _ = repeated(
        lambda: write_video(path, (frames[s:s + 32] for s in range(0, t, 32)), audio=audio), repeats)
    mb = os.path.getsize(path) / 2**20
    rows.append(Row(part, "encode", f"write_video H.264 yuv420p + AAC, {mb:.1f} MB", first, steady,
                    max(first - steady, 0)))
    frames = None   # free the frames before the streamed check

    print("  write_render (streamed check)", flush=True)
    t0 = time.perf_counter()
    write_render(os.path.join(folder, f"{part}_render"), flame, result, audio, size=size)
    rows.append(Row(part, "(check) write_render", "FLAME + render + encode streamed, as the CLI (once)",
                    None, time.perf_counter() - t0, summed=False))
    return rows


# --------------------------------------------------------------------------------------------- part (a)
def demo_part(args, audio: np.ndarray, folder: str) -> tuple[list[Row], str]:
    from avi_jax.assembly.common import load_workdir_config
    from avi_jax.checkpoints.flame import load_flame_model
    from avi_jax.inference import pipeline, system

    top = load_workdir_config(args.workdir)
    inf = top.inference
    options = pipeline.Options(window_seconds=float(inf.window_seconds),
                               overlap_seconds=float(inf.overlap_seconds),
                               bucket_seconds=tuple(float(b) for b in inf.bucket_seconds),
                               batch_size=int(inf.batch_size))
    print(f"[demo] loading {args.workdir} ({top.variant})", flush=True)
    t0 = time.perf_counter()
    face = system.TalkingFace.load(args.workdir)
    flame = load_flame_model(system.flame_path(None, args.workdir, top.variant, top.flame.model_path))
    load_s = time.perf_counter() - t0
    ic = face.instruct.model_config
    desc = (f"part (a): {args.workdir} ({top.variant} run): HuBERT {ic.audio.num_hidden_layers}L x "
            f"{ic.audio.hidden_size}, Q-Former {ic.qformer.num_queries} queries, LLaMA "
            f"{ic.llm.num_hidden_layers}L x {ic.llm.hidden_size} (V {ic.llm.vocab_size}, <= "
            f"{face.instruct.config.generation.max_new_tokens} new tokens); motion Wav2Vec2 "
            f"{face.motion_setup.model_config.audio.num_hidden_layers}L x "
            f"{face.motion_setup.model_config.audio.hidden_size}; style prior "
            f"{face.style.config.sampler.method} ({face.style.prior_config.num_timesteps} steps); windows "
            f"{options.window_seconds:g} s / overlap {options.overlap_seconds:g} s, buckets "
            f"{options.bucket_seconds}, batch {options.batch_size}; load {load_s:.1f} s")
    print(desc, flush=True)
    passes, result = model_passes(face, audio, options, args.repeats)
    part = "a"
    rows = [stage_row(part, "instructions", "face.instructions: HuBERT + Q-Former + LLaMA decode", passes),
            stage_row(part, "styles", "face.styles: text encoder + aligner + prior", passes),
            stage_row(part, "motion", "face.motion: Wav2Vec2 content + generator", passes)]
    rows += output_rows(part, flame, result, audio, args.render_size, args.repeats, folder)
    return rows, desc


# --------------------------------------------------------------------------------------------- part (b)
class PaperFace:
    """Paper-size stage 1, style prior and motion prior with random weights, with ``TalkingFace``'s
    instructions/styles/motion interface; ``seconds`` holds the instruction stage's breakdown."""

    def __init__(self, llm_layers: int, llm_dtype: str, seed: int = 0):
        import flax.linen as nn
        import jax
        import jax.numpy as jnp
        from avi_jax.assembly import common
        from avi_jax.assembly.motion import motion_model_config
        from avi_jax.models import audio_encoder as audio_lib, llama as llama_lib, qformer as qformer_lib
        from avi_jax.models import style_prior as prior_lib, text_encoder as text_lib
        from avi_jax.models.generate import generate
        from avi_jax.models.instructor import Instructor, InstructorConfig
        from avi_jax.models.motion import MotionPrior
        from configs import instruct, motion_prior, style_prior

        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._count = 0
        keys = iter(jax.random.split(jax.random.key(seed), 8))
        rs = np.random.RandomState(seed)
        ic, mc = instruct.get_config("paper"), motion_prior.get_config("paper")
        sc = style_prior.get_config("paper")

        # ---- stage 1: HuBERT-large -> Q-Former -> projection -> LLaMA-7B (N layers)
        m = ic.model
        llm = common.preset(llama_lib, m.llm, dtype=llm_dtype, param_dtype=llm_dtype,
                            num_hidden_layers=llm_layers, eos_token_id=None, pad_token_id=0)
        self.instructor_config = InstructorConfig(
            audio=common.preset(audio_lib.AudioEncoderConfig, m.audio_encoder),
            qformer=common.preset(qformer_lib.QFormerConfig, m.qformer), text=None, llm=llm,
            feature_layer=int(m.audio_encoder.feature_layer), text_pooling=m.text_encoder.pooling)
        model = Instructor(self.instructor_config)
        t_ids = jnp.asarray(rs.randint(3, llm.vocab_size, (1, TEMPLATE_TOKENS)), jnp.int32)
        t_mask = jnp.ones_like(t_ids, bool)
        dummy = (jnp.zeros((1, SAMPLE_RATE)), jnp.ones((1, SAMPLE_RATE), bool), t_ids, t_mask,
                 jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
        self.instruct_params = nn.meta.unbox(jax.jit(
            lambda r: model.init(r, *dummy, method=Instructor.init_tune))(next(keys)))["params"]

        def prompt_fn(p, a, msk):
            soft = model.apply({"params": p}, a, msk, method=Instructor.soft_prompt)
            b = a.shape[0]
            return model.apply({"params": p}, soft, jnp.repeat(t_ids, b, 0), jnp.repeat(t_mask, b, 0),
                               method=Instructor.prompt)

        self._prompt_fn = jax.jit(prompt_fn)
        self.max_new_tokens = int(ic.generation.max_new_tokens)
        llm0 = llm.replace(num_hidden_layers=0)
        llm_params = self.instruct_params["llm"]
        self._llms = {
            "llm_N": (llama_lib.Llama(llm), {"params": llm_params}),
            "llm_0": (llama_lib.Llama(llm0), {"params": {k: v for k, v in llm_params.items()
                                                         if not k.startswith("layers_")}})}
        self._generate = generate
        self.llm_layers, self.llm_total_layers = llm_layers, int(llama_lib.llama_7b().num_hidden_layers)

        # ---- motion prior: Wav2Vec2-base + paper content encoder / style encoder / generator
        mc.model.audio_encoder.source = "init"
        self.motion_config = motion_model_config(mc)
        motion_model = MotionPrior(self.motion_config)
        f = 4
        self.motion_params = nn.meta.unbox(jax.jit(lambda r: motion_model.init(
            r, jnp.zeros((1, f * 640)), jnp.ones((1, f * 640), bool), jnp.zeros((1, f, 53)),
            jnp.ones((1, f), bool)))(next(keys)))["params"]

        def motion_fn(params, a, msk, style):
            v = {"params": params}
            content, frame_mask = motion_model.apply(v, a, msk, method=MotionPrior.content)
            return motion_model.apply(v, content, frame_mask, style, method=MotionPrior.generate)

        self._motion_fn = jax.jit(motion_fn)

        # ---- style: CLIP ViT-L/14 text tower -> aligner -> x0 diffusion prior (DDPM, guidance)
        sm = sc.model
        text_cfg = common.preset(text_lib, sm.text_encoder)
        text_model = text_lib.text_encoder_for(text_cfg)
        text_dim = text_cfg.projection_dim or text_cfg.hidden_size
        self.prior_config = common.preset(prior_lib, sm.prior, text_dim=int(text_dim),
                                          style_dim=int(self.motion_config.style_embed_dim))
        self.text_config, self.text_tokens = text_cfg, int(sc.data.max_text_tokens)
        n = self.text_tokens
        cfg = self.prior_config
        z = jnp.zeros((1, cfg.style_dim))
        self.style_params = {
            "text_encoder": nn.meta.unbox(jax.jit(lambda r: text_model.init(
                r, jnp.zeros((1, n), jnp.int32), jnp.ones((1, n), bool),
                method=type(text_model).sentence_embedding))(next(keys)))["params"],
            "aligner": nn.meta.unbox(jax.jit(prior_lib.InstructionAligner(cfg).init)(
                next(keys), jnp.zeros((1, cfg.text_dim))))["params"],
            "prior": nn.meta.unbox(jax.jit(prior_lib.DiffusionPrior(cfg).init)(
                next(keys), z, jnp.zeros((1,), jnp.int32), z))["params"],
            "style_norm": nn.meta.unbox(prior_lib.style_norm_params(np.zeros((cfg.style_dim,), np.float32),
                                                                   np.float32(1.0))),
        }
        s = sc.sampler
        self.sampler = s

        def one(p, feature, key, k):
            return prior_lib.sample_style(cfg, p, feature[None], key, method=s.method,
                                          num_steps=int(s.num_steps), eta=float(s.eta),
                                          guidance_scale=float(s.guidance_scale), num_samples=k)[0]

        self._sample_fn = jax.jit(lambda p, i, msk, ks, k: jax.vmap(one, (None, 0, 0, None))(
            p, text_model.apply({"params": p["text_encoder"]}, i, msk,
                                method=type(text_model).sentence_embedding), ks, k), static_argnums=4)
        self._rs = rs

    def describe(self) -> str:
        c = self.instructor_config
        a, q, l = c.audio, c.qformer, c.llm
        w, mc, t, p = self.motion_config.audio, self.motion_config, self.text_config, self.prior_config
        return (f"part (b): random weights, configs' paper presets: HuBERT {a.num_hidden_layers}L x "
                f"{a.hidden_size}; Q-Former {q.num_queries} queries, {q.num_layers}L x {q.hidden_size}; "
                f"LLaMA-7B {self.llm_layers} of {self.llm_total_layers} layers x {l.hidden_size} "
                f"({l.param_dtype}), V {l.vocab_size}, prompt 1 + {q.num_queries} + {TEMPLATE_TOKENS} "
                f"tokens, {self.max_new_tokens} new tokens; CLIP text {t.num_hidden_layers}L x "
                f"{t.hidden_size} ({self.text_tokens} tokens); prior {p.depth}L x {p.width}, "
                f"{self.sampler.method} {p.num_timesteps} steps, guidance {self.sampler.guidance_scale}; "
                f"Wav2Vec2 {w.num_hidden_layers}L x {w.hidden_size}; generator {mc.gen_layers}L x {mc.gen_dim}")

    def _timed(self, key: str, fn: Callable[[], Any]) -> Any:
        import jax
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        self.seconds[key] += time.perf_counter() - t0
        return out

    def instructions(self, audio: np.ndarray, mask: np.ndarray) -> list[str]:
        import jax
        embeds, pmask = self._timed("encoders", lambda: self._prompt_fn(self.instruct_params, audio, mask))
        for key, (llm, params) in self._llms.items():
            self._timed(key, lambda: self._generate(
                llm, params, inputs_embeds=embeds, attention_mask=pmask, max_new_tokens=self.max_new_tokens,
                pad_token_id=0, rng=jax.random.key(0)))
        self.seconds["llm_steps"] += self.max_new_tokens      # decode steps of this call (batch B)
        self._count += audio.shape[0]
        return [f"random-weight instruction {self._count - audio.shape[0] + i}" for i in range(audio.shape[0])]

    def styles(self, texts: list[str], keys: Any, num_samples: int) -> np.ndarray:
        import jax.numpy as jnp
        n = len(texts)
        pad = (-n) % 8                                   # as StyleSetup.sample
        ids = self._rs.randint(3, self.text_config.vocab_size - 1, (n + pad, self.text_tokens)).astype(np.int32)
        mask = np.zeros(ids.shape, bool)
        mask[:, :TEXT_TOKENS] = True
        ids[:, TEXT_TOKENS - 1] = self.text_config.vocab_size - 1   # the largest id: CLIP pools there
        keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, 0)]) if pad else keys
        return np.asarray(self._sample_fn(self.style_params, ids, mask, keys, int(num_samples)))[:n]

    def motion(self, audio: np.ndarray, mask: np.ndarray, style: np.ndarray) -> np.ndarray:
        return np.asarray(self._motion_fn(self.motion_params, audio, mask, style))

    def reference_style(self, motion):  # pragma: no cover - not used by the benchmark
        raise NotImplementedError


def paper_part(args, audio: np.ndarray, folder: str, reuse: list[Row]) -> tuple[list[Row], str]:
    from avi_jax.checkpoints.flame import load_flame_model
    from avi_jax.data.demo_head import write_demo_head
    from avi_jax.inference import pipeline
    from configs import avi_talking

    inf = avi_talking.get_config("paper").inference
    options = pipeline.Options(window_seconds=float(inf.window_seconds),
                               overlap_seconds=float(inf.overlap_seconds),
                               bucket_seconds=tuple(float(b) for b in inf.bucket_seconds),
                               batch_size=int(inf.batch_size))
    print("[paper] building paper-size modules (random init)", flush=True)
    t0 = time.perf_counter()
    face = PaperFace(args.llm_layers, args.llm_dtype)
    init_s = time.perf_counter() - t0
    desc = (face.describe() + f"; windows {options.window_seconds:g} s / overlap "
            f"{options.overlap_seconds:g} s, batch {options.batch_size}; init {init_s:.1f} s")
    print(desc, flush=True)
    passes, result = model_passes(face, audio, options, args.repeats)
    n, total = face.llm_layers, face.llm_total_layers
    for p in passes:   # the 32-layer decode, extrapolated linearly in the layer count
        p["llm_32"] = p["llm_0"] + total * (p["llm_N"] - p["llm_0"]) / n
        p["instructions"] = p["encoders"] + p["llm_32"]
    p = passes[-1]
    layer_ms = 1e3 * (p["llm_N"] - p["llm_0"]) / n / p["llm_steps"]
    part = "b"
    enc = dataclasses.replace(stage_row(part, "  encoders", "HuBERT-large + Q-Former + projection + prompt",
                                        passes, "encoders"), summed=False)
    llm_n = dataclasses.replace(stage_row(part, f"  LLaMA {n} layers", "greedy decode, measured", passes,
                                          "llm_N"), summed=False)
    instr = stage_row(part, "instructions", f"HuBERT-large + Q-Former + LLaMA-7B (32 layers, extrapolated: "
                      f"t0 + 32 (t{n} - t0) / {n}; {layer_ms:.0f} ms per layer per decode step, "
                      f"{1e3 * p['llm_0'] / p['llm_steps']:.0f} ms for the rest; compile s: the measured "
                      f"encoders + {n}-layer decode, a 32-layer compile takes longer)", passes)
    instr = dataclasses.replace(instr, first_s=None, compile_s=enc.compile_s + llm_n.compile_s)
    rows = [instr, enc, llm_n,
            dataclasses.replace(stage_row(part, "  LLaMA 0 layers",
                                          "embedding + final norm + LM head, measured", passes, "llm_0"),
                                summed=False),
            stage_row(part, "styles", "CLIP-L text + aligner + prior (DDPM 100 steps, guidance)", passes),
            stage_row(part, "motion", "Wav2Vec2-base content + paper generator", passes)]
    if reuse:   # stages 4-6 do not depend on the models' size: those of (a), on a trained model's motion
        rows += [dataclasses.replace(r, part=part, what=f"as (a): {r.what}", first_s=None, compile_s=None)
                 for r in reuse if r.stage in ("FLAME", "render", "encode")]
    else:       # random-weight motion deforms the head far more than a trained model's would
        flame = load_flame_model(write_demo_head(os.path.join(folder, "demo_head")))
        rows += output_rows(part, flame, result, audio, args.render_size, args.repeats, folder)
    return rows, desc


# --------------------------------------------------------------------------------------------- part (c)
def long_part(args, folder: str) -> str:
    import soundfile as sf
    seconds = args.long_minutes * 60.0
    path = os.path.join(folder, "long.wav")
    sf.write(path, speech_clip(seconds, args.speech_dir), SAMPLE_RATE, subtype="PCM_16")
    out = os.path.join(folder, "long_out")
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "avi_jax.infer", "--workdir", args.workdir,
           "--audio", path, "--no-render", "--out", out]
    env = dict(os.environ, AVI_JAX_CACHE=os.path.join(folder, "jax_cache"))
    print(f"[long] {' '.join(cmd[2:])}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    if proc.returncode != 0 or rss is None or wall is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        return f"long run FAILED (exit {proc.returncode}):\n{tail}"
    wall_s = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall.group(1).split(":"))))
    rss_gb = int(rss.group(1)) * 1024 / 1e9
    with np.load(os.path.join(out, "long", "coefficients.npz")) as z:
        frames, windows = z["expression"].shape[0], z["instructions"].shape[0]
    verdict = "meets" if rss_gb < 4.0 else "EXCEEDS"
    return (f"| (c) long | {args.long_minutes:g} min ({seconds:g} s) | `python -m avi_jax.infer --workdir "
            f"{args.workdir} --audio long.wav --no-render` (cold compile cache) | peak RSS {rss_gb:.2f} GB "
            f"({verdict} < 4 GB) | wall {wall_s:.1f} s | RTF {wall_s / seconds:.3f} | {frames} frames, "
            f"{windows} windows |")


# --------------------------------------------------------------------------------------------- report
def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[Row], audio_s: float) -> str:
    lines = ["| part | stage | what runs | first s | compile s | steady s | steady s per audio s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.part} | {r.stage} | {r.what} | {_fmt(r.first_s)} | {_fmt(r.compile_s)} | "
                     f"{_fmt(r.steady_s)} | {r.steady_s / audio_s:.3f} |")
    return "\n".join(lines)


def summary(rows: list[Row], audio_s: float) -> str:
    scale = audio_s / PAPER["audio_s"]
    p_instr, p_syn = PAPER["instructions"] * scale, PAPER["synthesis"] * scale
    lines = ["| part | instruction generation s | synthesis s (styles + motion + FLAME + render + encode) | "
             "coefficients only s (instructions + styles + motion) | total s | real-time factor | "
             "compile s (all stages) |", "|---|---|---|---|---|---|---|",
             f"| paper, A100 (Sec. IV{'' if scale == 1 else f', scaled to {audio_s:g} s'}) | {p_instr:.2f} | "
             f"{p_syn:.2f} | - | {p_instr + p_syn:.2f} | {(p_instr + p_syn) / audio_s:.3f} | - |"]
    for part in sorted({r.part for r in rows}):
        s = {r.stage: r for r in rows if r.part == part and r.summed}
        instr = s["instructions"].steady_s
        syn = sum(s[k].steady_s for k in ("styles", "motion", "FLAME", "render", "encode") if k in s)
        coeff = instr + s["styles"].steady_s + s["motion"].steady_s
        comp = sum(r.compile_s or 0.0 for r in s.values())
        lines.append(f"| ({part}) | {instr:.2f} ({instr / p_instr:.2f}x paper) | {syn:.2f} "
                     f"({syn / p_syn:.2f}x paper) | {coeff:.2f} | {instr + syn:.2f} | "
                     f"{(instr + syn) / audio_s:.3f} | {comp:.1f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workdir", default="runs/demo",
                   help="a finished configs/avi_talking.py:demo (or :tiny) run, for parts (a) and (c)")
    p.add_argument("--seconds", type=float, default=30.0, help="length of the clip (the paper's: 30)")
    p.add_argument("--speech-dir", default=os.path.join(os.path.dirname(REPO), "shared", "fixtures", "speech"),
                   help="folder of .wav speech, concatenated into the clip")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per stage after the warm-up (median)")
    p.add_argument("--render-size", type=int, default=512)
    p.add_argument("--skip-demo", action="store_true", help="skip part (a)")
    p.add_argument("--paper", action="store_true", help="part (b): paper-size modules, random weights")
    p.add_argument("--llm-layers", type=int, default=2, help="(b) LLaMA-7B decoder layers built and timed")
    p.add_argument("--llm-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="(b) LLaMA parameter and compute dtype")
    p.add_argument("--long-minutes", type=float, default=0.0,
                   help="part (c): run infer --no-render on a recording this long (0: skip)")
    p.add_argument("--markdown", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.llm_layers < 1 or args.llm_layers > 32:
        p.error("need --repeats >= 1 and 1 <= --llm-layers <= 32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    dev = jax.devices()[0]
    header = [
        f"command: python {' '.join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}",
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; load average at start: {load_average()}",
        f"jax {jax.__version__} on {dev.platform}:{dev.device_kind} ({jax.device_count()} device(s)); "
        f"numpy {np.__version__}; python {platform.python_version()}",
    ]
    if not args.skip_demo or args.paper:
        header.append(f"clip: {args.seconds:g} s of {args.speech_dir} (concatenated); render "
                      f"{args.render_size}x{args.render_size}; 1 warm-up + {args.repeats} timed call(s) per stage")
    print("\n".join(header), flush=True)
    t0 = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="avi_bench_") as folder:
        if not args.skip_demo or args.paper:
            audio = speech_clip(args.seconds, args.speech_dir)
        if not args.skip_demo:
            r, d = demo_part(args, audio, folder)
            rows += r
            notes.append(d)
        if args.paper:
            r, d = paper_part(args, audio, folder, [r for r in rows if r.part == "a"])
            rows += r
            notes.append(d)
        long_line = long_part(args, folder) if args.long_minutes > 0 else ""
    parts = ["\n".join(header)] + (["\n".join(notes)] if notes else [])
    if rows:
        parts += [table(rows, args.seconds), summary(rows, args.seconds)]
    if long_line:
        parts.append("| part | recording | command | peak memory | wall time | wall s per audio s | output |\n"
                     "|---|---|---|---|---|---|---|\n" + long_line)
    parts.append(f"total wall time {time.perf_counter() - t0:.0f} s; load average at end: {load_average()}")
    text = "\n\n".join(parts) + "\n"
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
