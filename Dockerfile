# nuclei-app: the BIDS App image (BIDS Apps 1.0 entry point).
#
#   docker build -t nuclei-app:0.1.0 --build-arg SOURCE_URL="$(git remote get-url origin)" .
#   docker build -t nuclei-app:0.1.0-cpu --build-arg TORCH_VARIANT=cpu ...   (slim, CPU only)
#   docker run --rm --read-only --tmpfs /tmp --network none \
#       -v /path/to/bids:/data:ro -v /path/to/out:/out nuclei-app:0.1.0 /data /out participant --participant-label 01
#
# `make container-check` replays this file's COPY and `pip install` steps in a clean venv
# (no container engine needed) and runs the entry point on the embedded sample dataset;
# tests/test_containers.py checks that every install step is pinned like pyproject.toml.
FROM python:3.11-slim

ARG VERSION=0.1.0
# Where the code comes from; pass the repository URL at build time (see above).
ARG SOURCE_URL=unset
# Which torch build: "cuda" (default; PyPI's Linux wheel, runs on CPU and on NVIDIA GPUs) or
# "cpu" (PyTorch's CPU-only wheel index: no CUDA libraries, a far smaller image for CPU nodes).
ARG TORCH_VARIANT=cuda

LABEL org.opencontainers.image.title="nuclei-app" \
      org.opencontainers.image.description="BIDS App: de novo (annotation-free) segmentation of overlapping nuclei in multiplex IF whole-slide images, with self-diagnosis QC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch/torchvision first (the largest layer, rebuilt only when the pins change).
# TORCH_VARIANT=cuda: the default PyPI wheel of torch 2.14.1 for Linux x86_64 is the CUDA
# build: it runs on CPU and, through the nvidia-* wheels it depends on (pinned in
# constraints.txt), on NVIDIA GPUs with the host's driver (docker run --gpus all / apptainer
# run --nv). No other CUDA install.
# TORCH_VARIANT=cpu: the same versions from PyTorch's CPU wheel index (2.14.1+cpu, which the
# ==2.14.1 pins match); torch's few dependencies come from that index too.
COPY constraints.txt /opt/nuclei-app/constraints.txt
RUN case "${TORCH_VARIANT}" in \
        cuda) torch_index="" ;; \
        cpu) torch_index="--index-url https://download.pytorch.org/whl/cpu" ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not '${TORCH_VARIANT}'" >&2; exit 64 ;; \
    esac \
    && python -m pip install ${torch_index} -c /opt/nuclei-app/constraints.txt torch==2.14.1 torchvision==0.29.1

# The package itself, every dependency at the exact version of constraints.txt.
COPY pyproject.toml README.md /opt/nuclei-app/src/
COPY nuclei_app /opt/nuclei-app/src/nuclei_app
RUN python -m pip install -c /opt/nuclei-app/constraints.txt /opt/nuclei-app/src \
    && rm -rf /opt/nuclei-app/src

# A non-root user; the image itself is never written to at run time.
RUN useradd --system --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin nuclei

# Every writable path is /tmp (a tmpfs with --read-only --tmpfs /tmp) or the mounted output /
# work folders: caches and temporary files of Python, dask, torch, numba and matplotlib.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    NUMBA_CACHE_DIR=/tmp/numba \
    TORCH_HOME=/tmp/torch \
    DASK_TEMPORARY_DIRECTORY=/tmp/dask \
    NUCLEI_APP_CONTAINER_TYPE=docker \
    NUCLEI_APP_CONTAINER_TAG=nuclei-app:${VERSION} \
    NUCLEI_APP_TORCH_VARIANT=${TORCH_VARIANT}

USER nuclei:nuclei
WORKDIR /tmp

# BIDS Apps form: nuclei-app BIDS_DIR OUTPUT_DIR {train,participant,group} [options]
ENTRYPOINT ["nuclei-app"]
CMD ["--help"]
