"""Config values checked before a training run does any work (before the workdir is created).

``validate(config)`` walks every stage family of a run (the config itself, or ``config.instruct``,
``config.motion`` and ``config.style`` of the whole system, ``configs/avi_talking.py``) and raises one
``ConfigError`` whose message names each bad field by its full dotted path (``config.motion.motion.
total_steps``, as it is overridden on the command line) and what the field accepts. Without it, some bad
values fail late or silently: ``total_steps <= 0`` marked a stage finished with untrained weights,
``checkpoint.every = 0`` divided by zero after creating the workdir, and a batch size that does not divide
over the processes dropped examples.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import jax

from avi_jax.assembly.common import FAMILIES
from avi_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class _Checker:
    """Collects one message per bad field."""

    def __init__(self):
        self.problems: list[str] = []

    def check(self, block: Any, key: str, path: str, ok: Callable[[Any], bool], accepts: str,
              optional: bool = False) -> Any:
        """``block[key]`` if ``ok`` says so; else records ``"<path>.<key> = <value>: must be <accepts>"``.
        A missing field is a problem unless ``optional``."""
        if block is None or key not in block:
            if not optional:
                self.problems.append(f"{path}.{key} is missing: must be {accepts}")
            return None
        value = block[key]
        try:
            good = bool(ok(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            self.problems.append(f"{path}.{key} = {value!r}: must be {accepts}")
            return None
        return value

    def add(self, message: str) -> None:
        self.problems.append(message)


def family_blocks(config: Any) -> list[tuple[str, Any]]:
    """``(dotted path, family config)`` of each stage family in ``config``: ``[("config", config)]`` for a
    single family, ``[("config.instruct", ...), ("config.motion", ...), ...]`` for the whole system."""
    if config.get("family") == "system":
        return [(f"config.{f}", config[f]) for f in FAMILIES if f in config]
    return [("config", config)]


def stage_blocks(family: Any) -> list[str]:
    """The names of a family config's stage blocks (sub-configs with ``total_steps``), in config order."""
    out = []
    for key in family.keys():
        value = family[key]
        if hasattr(value, "keys") and "total_steps" in value:
            out.append(key)
    return out


def _mesh_batch_devices(mesh: Any) -> int | None:
    """The number of devices a global batch is split over ('data' x 'fsdp'), or None when the mesh cannot
    be resolved here (``sharding.make_mesh`` then names the problem)."""
    try:
        sizes = {a: int(mesh[a]) for a in MESH_AXES}
    except (KeyError, TypeError, ValueError):
        return None
    if list(sizes.values()).count(-1) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        return None
    if -1 in sizes.values():
        known = 1
        for s in sizes.values():
            if s != -1:
                known *= s
        n = jax.device_count()
        if n % known:
            return None
        sizes = {a: (n // known if s == -1 else s) for a, s in sizes.items()}
    return sizes["data"] * sizes["fsdp"]


def _check_batch(c: _Checker, block: Any, key: str, path: str, processes: int, batch_devices: int | None,
                 optional: bool = False) -> None:
    value = c.check(block, key, path, lambda v: _is_int(v) and v >= 1, "an integer >= 1 (examples per "
                    "global batch, over all processes)", optional=optional)
    if value is None:
        return
    if value % processes:
        example = max(processes, value // processes * processes)
        c.add(f"{path}.{key} = {value}: must be divisible by the number of processes ({processes}); each "
              f"process reads batch_size / {processes} examples (e.g. {example})")
    elif batch_devices and value % batch_devices:
        c.add(f"{path}.{key} = {value}: must be divisible by the {batch_devices} devices of the mesh's batch "
              f"axes (config.mesh data x fsdp); e.g. {max(batch_devices, value // batch_devices * batch_devices)}")


def _check_shared(c: _Checker, path: str, fc: Any) -> None:
    """``seed`` and ``mesh`` (set once at the top of the whole-system config)."""
    c.check(fc, "seed", path, _is_int, "an integer")
    mesh = fc.get("mesh")
    if mesh is not None:
        for axis in MESH_AXES:
            c.check(mesh, axis, f"{path}.mesh", lambda v: _is_int(v) and (v >= 1 or v == -1),
                    "an integer >= 1, or -1 (the remaining devices)")
        if sum(1 for a in MESH_AXES if a in mesh and mesh[a] == -1) > 1:
            c.add(f"{path}.mesh: at most one of data, fsdp, tensor may be -1, got "
                  f"{ {a: mesh[a] for a in MESH_AXES if a in mesh} }")


def _check_family(c: _Checker, path: str, fc: Any, stages: tuple[str, ...] | None, *, shared: bool,
                  own_data: bool) -> None:
    """One family config. ``shared``: also check seed and mesh (not for the system's families, whose
    values are the top-level ones); ``own_data``: also check data.source and data.demo (the system's
    motion and style families share the instruct family's)."""
    processes = jax.process_count()
    if shared:
        _check_shared(c, path, fc)
    mesh = fc.get("mesh")
    batch_devices = _mesh_batch_devices(mesh) if mesh is not None else None

    ck = fc.get("checkpoint")
    if ck is not None:
        c.check(ck, "every", f"{path}.checkpoint", lambda v: _is_int(v) and v >= 1,
                "an integer >= 1 (save a checkpoint every N steps; the last step is always saved)")
        c.check(ck, "keep", f"{path}.checkpoint", lambda v: _is_int(v) and v >= 1,
                "an integer >= 1 (checkpoints kept)")
        c.check(ck, "async_save", f"{path}.checkpoint", lambda v: isinstance(v, bool), "True or False",
                optional=True)
    profile = fc.get("profile")
    if profile is not None:
        start = c.check(profile, "start_step", f"{path}.profile", _is_int,
                        "an integer (the first profiled step, 0-based; -1 = no profile)", optional=True)
        if start is not None and start >= 0:
            c.check(profile, "num_steps", f"{path}.profile", lambda v: _is_int(v) and v >= 1,
                    "an integer >= 1 (steps traced)")

    data = fc.get("data")
    if data is not None:
        dp = f"{path}.data"
        if own_data:
            c.check(data, "source", dp, lambda v: v in ("demo", "prepared"), "'demo' or 'prepared'",
                    optional=True)
        c.check(data, "max_audio_seconds", dp, lambda v: _is_real(v) and v > 0, "a number of seconds > 0",
                optional=True)
        c.check(data, "max_eval_clips", dp, lambda v: _is_int(v) and v >= 0,
                "an integer >= 0 (0 = the whole evaluation split)", optional=True)
        c.check(data, "stats_max_clips", dp, lambda v: _is_int(v) and v >= 0,
                "an integer >= 0 (0 = every clip)", optional=True)
        c.check(data, "max_text_tokens", dp, lambda v: _is_int(v) and v >= 2, "an integer >= 2", optional=True)
        demo = data.get("demo")
        if own_data and demo is not None and data.get("source") == "demo":
            c.check(demo, "num_speakers", f"{dp}.demo", lambda v: _is_int(v) and v >= 4,
                    "an integer >= 4 (train, validation and test speakers)", optional=True)
            c.check(demo, "clip_seconds", f"{dp}.demo", lambda v: _is_real(v) and v > 0,
                    "a number of seconds > 0", optional=True)

    blocks = stage_blocks(fc)
    for name in blocks:
        if stages is not None and name not in stages:
            continue          # not run now (e.g. `:stage=tune`)
        sp, sc = f"{path}.{name}", fc[name]
        c.check(sc, "total_steps", sp, lambda v: _is_int(v) and v >= 1, "an integer >= 1 (optimizer steps)")
        _check_batch(c, sc, "batch_size", sp, processes, batch_devices)
        _check_batch(c, sc, "eval_batch_size", sp, processes, batch_devices, optional=True)
        c.check(sc, "log_every", sp, lambda v: _is_int(v) and v >= 1,
                "an integer >= 1 (write training metrics every N steps)")
        c.check(sc, "eval_every", sp, lambda v: _is_int(v) and v >= 0,
                "an integer >= 0 (evaluate every N steps; 0 = only at the end)")
        opt = sc.get("optimizer")
        if opt is None:
            continue
        op = f"{sp}.optimizer"
        c.check(opt, "lr", op, lambda v: _is_real(v) and v > 0, "a number > 0")
        c.check(opt, "warmup_steps", op, lambda v: _is_int(v) and v >= 0, "an integer >= 0", optional=True)
        c.check(opt, "final_lr_ratio", op, lambda v: _is_real(v) and v >= 0, "a number >= 0", optional=True)
        c.check(opt, "weight_decay", op, lambda v: _is_real(v) and v >= 0, "a number >= 0", optional=True)
        c.check(opt, "b1", op, lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)", optional=True)
        c.check(opt, "b2", op, lambda v: _is_real(v) and 0 <= v < 1, "a number in [0, 1)", optional=True)
        c.check(opt, "clip_norm", op, lambda v: _is_real(v) and v > 0, "a number > 0 (global-norm clipping)",
                optional=True)


def validate(config: Any) -> None:
    """Check the values of every field a training run reads before it starts.

    Checked (for each family, and each stage block that this run trains): ``total_steps`` >= 1;
    ``batch_size`` (and ``eval_batch_size``) >= 1 and divisible by ``jax.process_count()`` and by the
    devices of the mesh's batch axes; ``log_every`` >= 1; ``eval_every`` >= 0; the optimizer's ``lr`` > 0,
    ``warmup_steps`` >= 0, ``b1``/``b2`` in [0, 1), ``clip_norm`` > 0; ``checkpoint.every`` and
    ``checkpoint.keep`` >= 1; ``mesh`` sizes >= 1 or one -1; ``profile``; ``data`` sizes; ``stages``
    non-empty.

    Raises ``ConfigError``: one line naming each bad field by its dotted path (``config.align.total_steps``)
    and what it accepts.
    """
    c = _Checker()
    stages = config.get("stages")
    if not stages or isinstance(stages, str):
        c.add(f"config.stages = {stages!r}: must be a non-empty tuple of stage names")
        stages = None
    else:
        stages = tuple(stages)
    system = config.get("family") == "system"
    if system:
        _check_shared(c, "config", config)
    for path, fc in family_blocks(config):
        _check_family(c, path, fc, stages, shared=not system, own_data=not system or path == "config.instruct")
    if c.problems:
        if len(c.problems) == 1:
            raise ConfigError(c.problems[0])
        raise ConfigError(f"{len(c.problems)} invalid config values: " + "; ".join(c.problems))
