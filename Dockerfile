# The image the counting flow's remote steps run in: AWS Batch (@batch, Step Functions) and Kubernetes
# (@kubernetes, Argo Workflows). It holds Python 3.11 and the `counting` package with the dependencies pinned in
# setup.py; Metaflow ships the flow's own code with each run.
#
#   docker build -t counting:0.1.0-cu130 .
#
# torch==2.14.1 from PyPI is built for CUDA 13.0 and installs the CUDA libraries it needs as wheels; the base
# image adds what the NVIDIA container runtime expects. GPU hosts need an NVIDIA driver of release 580 or newer.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y software-properties-common gpg-agent \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*

# Metaflow starts tasks with `python`: the virtual environment comes first on PATH. boto3 and requests, which
# Metaflow would otherwise pip-install at the start of every task, are installed with the package.
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    METAFLOW_SKIP_INSTALL_DEPENDENCIES=1

WORKDIR /opt/counting

# Dependencies in their own layer: a change to the package's code does not reinstall torch.
COPY setup.py ./
RUN mkdir counting \
 && touch counting/__init__.py \
 && pip install '.[sagemaker]' \
 && pip uninstall -y counting \
 && rm -rf counting build *.egg-info

COPY counting ./counting
RUN pip install --no-deps . \
 && rm -rf build *.egg-info \
 && cd / && python -c "import counting.pipeline, torch, torchvision; print('counting', counting.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /
