"""distill_jax: dataset distillation in JAX/Flax."""

import setuptools

setuptools.setup(
    name="distill_jax",
    version="0.1.0",
    description=(
        "Dataset distillation in JAX/Flax: FRePo, MTT, D3, D3S, APM and LatentDD "
        "as pure objectives plus resumable distillation loops."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["distill_jax", "distill_jax.*"]),
    install_requires=[
        # Ranges around the versions verified together (jax 0.10.2, flax 0.12.8, optax 0.2.8,
        # orbax-checkpoint 0.12.8, tensorflow-datasets 4.9.10).
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "chex>=0.1.90",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<4.10",
        # tfds 4.9.10 imports it but does not declare it.
        "importlib_resources",
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "scipy",
        "scikit-learn",
        "pillow",
        "matplotlib",
        "tensorboardX",
        "tqdm",  # The progress bar in terminals and notebooks (tqdm.auto).
        # Runs D3's federated subtasks as jobs: local subprocesses or a SLURM job array.
        "submitit>=1.5",
        # Reads a local Stable Diffusion VAE saved with PyTorch weights (LatentDD).
        "safetensors",
    ],
    extras_require={
        # tfds catalog datasets (cifar10, ...) are prepared through TensorFlow.
        "tf": ["tensorflow-cpu"],
        # Accelerators (README "Several devices and hosts"): JAX's CUDA 12 wheels with their
        # NVIDIA libraries, or the TPU runtime. The default install stays CPU-only.
        "cuda12": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # pytest-xdist: the suite runs in two worker processes (pytest.ini).
        # nbclient + ipykernel: tests/test_notebooks.py runs colab/*.ipynb in a Jupyter kernel.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9",
                 "ipykernel>=6"],
    },
)
