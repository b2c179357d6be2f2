from setuptools import find_packages, setup

setup(
    name="eomt",
    version="0.1.0",
    description="Encoder-only Mask Transformer: a plain ViT for image segmentation",
    packages=find_packages(include=["eomt", "eomt.*"]),
    package_data={"eomt": ["defaults.yaml", "deploy/page.html"]},
    python_requires=">=3.10",
    install_requires=[
        "torch",
        "torchvision",
        "timm",
        "scipy",
        "pycocotools",
        "numpy",
        "pillow",
        "pyspng",
        "omegaconf",
        "tqdm",
        "safetensors",
        "fvcore",
    ],
    extras_require={
        "wandb": ["wandb"],
        "onnx": ["onnx", "onnxruntime"],
        "report": ["matplotlib"],  # tools/report.py, tools/evaluate_checkpoints.py pictures
        "tensorboard": ["tensorboard"],  # logging.tensorboard=true
        "slurm": ["submitit"],  # tools/sweep.py --slurm
        "serve": ["fastapi", "uvicorn", "python-multipart"],  # tools/serve.py
        "video": ["av"],  # tools/predict.py --video (PyAV)
    },
)
