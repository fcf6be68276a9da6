"""Test setup: 8 fake CPU devices (set before jax is imported) and the shared fixtures folder."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_fixtures() -> pathlib.Path:
    """``../shared/fixtures``; tests using it skip when the folder is absent (a user's checkout)."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip(f"{path} is absent (it exists beside the repo in CI only)")
    return path


@pytest.fixture(scope="session")
def motion_workdir(tmp_path_factory):
    """A fake finished tiny motion run: its config.json and a randomly initialised, exported style
    encoder and normalizer (the style stage needs nothing else from it)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from avi_jax.data import schema
    from avi_jax.checkpoints.exported import export_params
    from avi_jax.training.experiment import save_config
    from avi_jax.assembly.motion import MotionSetup
    from configs import motion_prior

    workdir = str(tmp_path_factory.mktemp("motion_run"))
    config = motion_prior.get_config("tiny")
    save_config(config, workdir)
    setup = MotionSetup(config, workdir, data=False)
    f, n = 4, 4 * schema.SAMPLES_PER_FRAME
    batch = {"audio": jnp.zeros((1, n)), "audio_mask": jnp.ones((1, n), bool),
             "expression": jnp.zeros((1, f, schema.N_EXPRESSION)), "jaw_pose": jnp.zeros((1, f, schema.N_JAW)),
             "coeff_mask": jnp.ones((1, f), bool)}
    params = jax.jit(lambda r: nn.meta.unbox(setup.init_params(r, batch, with_statistics=False)))(
        jax.random.key(0))
    params["normalizer"] = {"mean": jnp.full((53,), 0.01), "scale": jnp.full((53,), 0.2)}
    export_params({c: params[c] for c in ("style_encoder", "normalizer")},
                                os.path.join(workdir, "motion", "params.safetensors"))
    return workdir


@pytest.fixture(scope="session")
def system_workdir(tmp_path_factory):
    """A finished tiny run of the whole system (configs/avi_talking.py:tiny: lm, align, tune, motion,
    style; ~1-2 minutes on 2 cores), shared by the inference and export tests."""
    from avi_jax.training.experiment import train_and_evaluate
    from configs import avi_talking

    workdir = str(tmp_path_factory.mktemp("system_run"))
    train_and_evaluate(avi_talking.get_config("tiny"), workdir)
    return workdir
