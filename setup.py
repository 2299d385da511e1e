import os
from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def read_requirements(name):
  with open(os.path.join(here, name)) as f:
    return [l.strip() for l in f if l.strip() and not l.startswith("#")]


setup(
    name="recycle_jax",
    version="0.1.0",
    description="Recycle a pool of checkpoints into one merged model: CMA-ES over merge "
                "weights, compiled in JAX (Khalifa et al. 2024).",
    packages=find_packages(include=["recycle_jax", "recycle_jax.*"]),
    python_requires=">=3.11",
    install_requires=read_requirements("requirements.txt"),
    extras_require={"test": read_requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["recycle-jax=recycle_jax.cli:main"]},
)
