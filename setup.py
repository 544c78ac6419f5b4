from setuptools import setup

setup(
    name="videorepa",
    version="0.1.0",
    description="Fused Triton kernels for VideoREPA's Token Relation Distillation loss, and a CogVideoX finetuner",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ installs as videorepa.kernels, never as a top-level `kernels`: Hugging Face ships a PyPI package of
    # that name, which transformers and diffusers detect and import.
    packages=["videorepa", "videorepa.kernels"],
    package_dir={"videorepa": "videorepa", "videorepa.kernels": "kernels"},
    # The tiny world's pretrained VAE and teacher (a few MB), which the embedded default trains against.
    package_data={"videorepa": ["assets/tiny-world/*.json", "assets/tiny-world/*/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "numpy", "matplotlib"],
        "bench": ["matplotlib", "numpy"],
        "train": ["diffusers>=0.32", "transformers>=4.46", "tokenizers", "peft>=0.13", "safetensors", "tqdm", "av", "numpy"],
        "flash": ["flash-attn>=2.6"],
    },
)
