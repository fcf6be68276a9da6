"""Backbone speed: Flax HuBERT forward and Flax LLaMA KV-cache generation vs transformers (PyTorch).

Two side-by-side measurements in one process, on the same random weights, the same inputs and float32:

1. **HuBERT forward** -- ``avi_jax.models.audio_encoder.AudioEncoder`` (loaded with
   ``avi_jax.checkpoints.audio_encoder.load_audio_encoder`` from a folder written by transformers
   ``HubertModel(config).save_pretrained``) vs that ``HubertModel`` on ``--audio-seconds`` of 16 kHz audio.
   Throughput = seconds of audio encoded per wall-clock second. Parity: ``max|jax - torch| / max|torch|``
   of ``last_hidden_state``.
2. **LLaMA generation** -- ``avi_jax.models.generate.generate`` (params from
   ``avi_jax.checkpoints.llama.load_llama``) vs transformers ``LlamaForCausalLM.generate``; greedy, the same
   prompt batch, exactly ``--new-tokens`` new tokens (the model has no EOS id, so neither side can stop
   early; ``min_new_tokens`` is set on the transformers side as well). Throughput = generated tokens
   (batch x new tokens, prefill included in the time) per second. Parity: fraction of identical tokens.

Method: weights are random (``torch.manual_seed``), saved with ``save_pretrained`` into a temporary
folder and loaded by our loaders, so the weight conversion is exercised too. JAX: ``jax.jit`` compile is
timed separately (``.lower().compile()`` for HuBERT; for generation, the first call minus the median
call, since the jitted function is built inside ``generate``); every timed JAX call ends in
``block_until_ready``. PyTorch: ``torch.inference_mode()``, ``torch.set_num_threads(os.cpu_count())``
(``--torch-threads``), ``torch.cuda.synchronize`` on GPU; its first call is an untimed warm-up too.
Then ``--repeats`` rounds each time one JAX call and one PyTorch call (interleaved, so that load changes
on a shared machine hit both alike); medians are reported. Ratio = JAX throughput / PyTorch throughput
(> 1: JAX faster). Both sides compute in true float32: TF32 is disabled in PyTorch and JAX matmuls use
``precision='highest'`` unless ``--allow-tf32`` (only matters on GPUs).

Caveat for shared machines: PyTorch's OpenMP workers spin-wait at barriers, so when the cores are
oversubscribed by other processes ``--torch-threads`` > 1 can make PyTorch many times slower (we saw
10x for ``generate`` at load average 10 on 2 cores) while JAX's thread pool degrades far less, which
inflates the JAX/PyTorch ratio. Run on an idle machine (the header prints the load average at start and
end), or compare per core: ``taskset -c 0 python benchmarks/backbones.py --torch-threads 1``.
Results and their caveats: ``benchmarks/RESULTS.md``.

Usage (defaults: HuBERT-base on 10 s, a ~134M-parameter LLaMA (768 wide, 12 layers, 12 heads, SwiGLU
2048, vocab 32000) generating 64 tokens for a batch of 4 prompts of 32 tokens; 5 repeats; about 1.5-2
minutes on an idle 2-core CPU, much longer when PyTorch threads are starved)::

  python benchmarks/backbones.py
  python benchmarks/backbones.py --audio-config large --audio-seconds 30 --repeats 3
  python benchmarks/backbones.py --skip-audio --gen-batch 8 --new-tokens 128 --markdown results.md
  python benchmarks/backbones.py --audio-config tiny --llm-layers 2 --llm-hidden 128 --llm-heads 4 \\
      --llm-ffn 256 --vocab 1000 --repeats 2        # smoke test, seconds

On a GPU machine the script runs JAX on ``jax.devices()[0]`` and PyTorch on ``cuda`` (``--device auto``,
the default; ``--device cpu`` forces both onto the CPU); the header and the table name each side's
device (``platform:device_kind`` for JAX).
Targets (issue): HuBERT >= 1.0x PyTorch speed; generation >= 2x transformers ``generate`` tokens/s.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np

SAMPLE_RATE = 16000


@dataclasses.dataclass
class Row:
    """One line of the results table (times in seconds)."""
    model: str
    config: str
    framework: str
    device: str
    compile_s: float | None
    first_s: float
    median_s: float
    throughput: float
    unit: str
    ratio: float | None = None
    parity: str = ""


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def time_interleaved(calls: dict[str, Callable[[], Any]], repeats: int
                     ) -> dict[str, tuple[float, list[float]]]:
    """Time each zero-argument call (which must block until its result is ready): one first call each
    (reported separately: compile / warm-up), then ``repeats`` rounds calling every function once per
    round, so that load changes on a shared machine hit all of them alike.

    Returns {name: (first call seconds, [seconds per timed call])}.
    """
    first, times = {}, {name: [] for name in calls}
    for name, fn in calls.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (first[name], times[name]) for name in calls}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b| (float64)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ----------------------------------------------------------------------------------------------- audio
def audio_config(name: str):
    """transformers ``HubertConfig`` for 'tiny', 'base' (hubert-base-ls960) or 'large' (hubert-large-ll60k)."""
    from avi_jax.models.audio_encoder import AudioEncoderConfig
    import transformers
    cfg = {"tiny": AudioEncoderConfig.tiny, "base": AudioEncoderConfig.hubert_base,
           "large": AudioEncoderConfig.hubert_large}[name]()
    return transformers.HubertConfig(**cfg.to_hf())


def bench_audio(args, torch_device: str, jax_device: str, torch_name: str) -> list[Row]:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from avi_jax.checkpoints.audio_encoder import load_audio_encoder
    from avi_jax.models.audio_encoder import AudioEncoder

    hf_cfg = audio_config(args.audio_config)
    desc = (f"{args.audio_config}: {hf_cfg.num_hidden_layers}L x {hf_cfg.hidden_size}, "
            f"B={args.audio_batch} x {args.audio_seconds:g} s")
    print(f"[audio] building HubertModel ({desc})", flush=True)
    torch.manual_seed(0)
    hf = transformers.HubertModel(hf_cfg).eval()
    rs = np.random.RandomState(0)
    wav = rs.randn(args.audio_batch, int(args.audio_seconds * SAMPLE_RATE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        cfg, params = load_audio_encoder(folder)
    hf = hf.to(torch_device)
    params = jax.device_put(params)
    model = AudioEncoder(cfg)

    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x).last_hidden_state)
    x = jax.device_put(jnp.asarray(wav))
    t0 = time.perf_counter()
    compiled = fwd.lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    xt = torch.from_numpy(wav).to(torch_device)
    sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)

    def run_torch():
        with torch.inference_mode():
            y = hf(xt).last_hidden_state
        sync()
        return y

    timing = time_interleaved(
        {"jax": lambda: compiled(params, x).block_until_ready(), "torch": run_torch}, args.repeats)
    (first_j, times_j), (first_t, times_t) = timing["jax"], timing["torch"]
    ours = np.asarray(compiled(params, x))
    theirs = run_torch().float().cpu().numpy()
    err = rel_err(ours, theirs)
    parity = f"max rel err {err:.1e} ({'ok' if err <= 1e-4 else 'FAIL'} at 1e-4)"
    audio_s = args.audio_batch * args.audio_seconds
    med_j, med_t = statistics.median(times_j), statistics.median(times_t)
    print(f"[audio] jax {med_j:.3f}s  torch {med_t:.3f}s  {parity}", flush=True)
    return [
        Row("HuBERT forward", desc, "JAX/Flax", jax_device, compile_s, first_j, med_j, audio_s / med_j,
            "audio s/s", med_t / med_j, parity),
        Row("HuBERT forward", desc, "PyTorch", torch_name, None, first_t, med_t, audio_s / med_t,
            "audio s/s", 1.0, parity),
    ]


# ----------------------------------------------------------------------------------------------- llama
def bench_llama(args, torch_device: str, jax_device: str, torch_name: str) -> list[Row]:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from avi_jax.checkpoints.llama import count_params, load_llama
    from avi_jax.models import generate as G
    from avi_jax.models.llama import Llama

    kv_heads = args.llm_kv_heads or args.llm_heads
    hf_cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.llm_hidden, intermediate_size=args.llm_ffn,
        num_hidden_layers=args.llm_layers, num_attention_heads=args.llm_heads,
        num_key_value_heads=kv_heads, max_position_embeddings=max(2048, args.prompt_len + args.new_tokens),
        bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    if args.weight_std:
        # Larger random weights make greedy continuations vary (std 0.02 tends to repeat one token),
        # which makes the token-identity check stricter.
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" not in name:
                    p.normal_(0.0, args.weight_std)
    hf.generation_config.eos_token_id = None
    hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        cfg, params = load_llama(folder)
    n_params = count_params(params)
    desc = (f"{n_params / 1e6:.3g}M: {cfg.num_hidden_layers}L x {cfg.hidden_size}, {cfg.num_attention_heads}/"
            f"{cfg.num_key_value_heads} heads, ffn {cfg.intermediate_size}, V {cfg.vocab_size}; "
            f"B={args.gen_batch}, prompt {args.prompt_len}, +{args.new_tokens} tok")
    print(f"[llama] {desc}", flush=True)
    hf = hf.to(torch_device)
    params = jax.device_put({"params": params})
    model = Llama(cfg)
    rs = np.random.RandomState(1)
    ids = rs.randint(3, args.vocab, (args.gen_batch, args.prompt_len)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    ids_j, mask_j = jax.device_put(jnp.asarray(ids)), jax.device_put(jnp.asarray(mask))

    def run_jax():
        return G.generate(model, params, input_ids=ids_j, attention_mask=mask_j,
                          max_new_tokens=args.new_tokens, eos_token_id=(), pad_token_id=0)

    ids_t = torch.from_numpy(ids.astype(np.int64)).to(torch_device)
    mask_t = torch.from_numpy(mask.astype(np.int64)).to(torch_device)
    sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)

    def run_torch():
        with torch.inference_mode():
            out = hf.generate(input_ids=ids_t, attention_mask=mask_t, do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              eos_token_id=None, pad_token_id=0)
        sync()
        return out

    timing = time_interleaved(
        {"jax": lambda: run_jax().block_until_ready(), "torch": run_torch}, args.repeats)
    (first_j, times_j), (first_t, times_t) = timing["jax"], timing["torch"]
    ours = np.asarray(run_jax())
    theirs = run_torch()[:, args.prompt_len:].cpu().numpy()
    assert ours.shape == theirs.shape == (args.gen_batch, args.new_tokens), (ours.shape, theirs.shape)
    same = ours == theirs
    first_diff = [int(np.argmin(r)) if not r.all() else None for r in same]
    parity = f"tokens identical {same.mean() * 100:.1f}%"
    if not same.all():
        parity += f" (first divergence per row: {first_diff})"
    tokens = args.gen_batch * args.new_tokens
    med_j, med_t = statistics.median(times_j), statistics.median(times_t)
    compile_s = max(first_j - med_j, 0.0)
    print(f"[llama] jax {med_j:.3f}s  torch {med_t:.3f}s  {parity}", flush=True)
    return [
        Row("LLaMA greedy generate", desc, "JAX/Flax", jax_device, compile_s, first_j, med_j,
            tokens / med_j, "tok/s", med_t / med_j, parity),
        Row("LLaMA greedy generate", desc, "PyTorch (transformers generate)", torch_name, None, first_t,
            med_t, tokens / med_t, "tok/s", 1.0, parity),
    ]


# ----------------------------------------------------------------------------------------------- report
def table(rows: list[Row]) -> str:
    head = ("| model | config | framework | device | compile s | first call s | median s | throughput "
            "| speed ratio (JAX/PyTorch) | parity |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        compile_s = f"{r.compile_s:.2f}" if r.compile_s is not None else "-"
        lines.append(
            f"| {r.model} | {r.config} | {r.framework} | {r.device} | {compile_s} | {r.first_s:.3f} | "
            f"{r.median_s:.3f} | {r.throughput:.1f} {r.unit} | "
            f"{'' if r.ratio is None else f'{r.ratio:.2f}x'} | {r.parity} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per framework (median reported)")
    p.add_argument("--skip-audio", action="store_true")
    p.add_argument("--skip-llm", action="store_true")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: JAX's default backend, PyTorch on cuda when JAX is on a GPU and cuda is "
                        "available; cpu: both on the CPU; gpu: both on the GPU (error if either has none)")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    p.add_argument("--allow-tf32", action="store_true",
                   help="let both frameworks use TF32 matmuls/convs on GPUs (default: true float32)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    a = p.add_argument_group("HuBERT")
    a.add_argument("--audio-config", choices=("tiny", "base", "large"), default="base")
    a.add_argument("--audio-seconds", type=float, default=10.0)
    a.add_argument("--audio-batch", type=int, default=1)
    g = p.add_argument_group("LLaMA")
    g.add_argument("--llm-hidden", type=int, default=768)
    g.add_argument("--llm-layers", type=int, default=12)
    g.add_argument("--llm-heads", type=int, default=12)
    g.add_argument("--llm-kv-heads", type=int, default=0, help="0: = --llm-heads (no GQA)")
    g.add_argument("--llm-ffn", type=int, default=2048)
    g.add_argument("--vocab", type=int, default=32000)
    g.add_argument("--gen-batch", type=int, default=4)
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--weight-std", type=float, default=0.0,
                   help="re-draw LLaMA weights with this std (0: transformers init, std 0.02)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax
    import torch
    import transformers

    jax.config.update("jax_enable_x64", False)
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.allow_tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    torch.set_num_threads(args.torch_threads)
    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    if args.device == "gpu":
        if jax.default_backend() != "gpu" or not torch.cuda.is_available():
            raise SystemExit(f"--device gpu: JAX backend is {jax.default_backend()!r}, "
                             f"torch.cuda.is_available() = {torch.cuda.is_available()}")
    use_cuda = args.device != "cpu" and jax.default_backend() == "gpu" and torch.cuda.is_available()
    torch_device = "cuda" if use_cuda else "cpu"
    dev = jax.devices()[0]
    jax_device = f"{dev.platform}:{dev.device_kind}"
    torch_name = torch_device
    if torch_device.startswith("cuda"):
        torch_name = f"cuda:{torch.cuda.get_device_name(torch.device(torch_device))}"
    else:
        torch_name = f"cpu ({torch.get_num_threads()} threads)"
    header = [
        f"command: python {' '.join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]))}",
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; load average at start: {load_average()}",
        f"jax {jax.__version__} on {jax_device} ({jax.device_count()} device(s)); torch {torch.__version__} "
        f"on {torch_name}; transformers {transformers.__version__}; numpy {np.__version__}; "
        f"python {platform.python_version()}",
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
    ]
    print("\n".join(header), flush=True)
    rows: list[Row] = []
    t0 = time.perf_counter()
    if not args.skip_audio:
        rows += bench_audio(args, torch_device, jax_device, torch_name)
    if not args.skip_llm:
        rows += bench_llama(args, torch_device, jax_device, torch_name)
    footer = f"total wall time {time.perf_counter() - t0:.0f} s; load average at end: {load_average()}"
    text = "\n".join(header) + "\n\n" + table(rows) + "\n\n" + footer + "\n"
    print()
    print(table(rows))
    print()
    print(footer)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
