# The vlmlab image: `docker run --gpus all --shm-size=2g -v "$PWD/runs:/work" vlmlab harness run dpo`.
# Default base: Ray's own CUDA image (T4-ready, Python 3.11), so the same image can be a Ray cluster's node image.
# Any base with Python 3.11 and venv works, e.g. a CPU build:
#   docker build --build-arg BASE_IMAGE=debian-py311 -t vlmlab .
# Local wheels (e.g. a CPU torch) are taken from wheels/ in the build context (bind-mounted, never copied in).
# scripts/build-image [--local-base] wraps this build (--local-base: a Debian base made here, CPU torch).
# A TLS-inspecting proxy's CA bundle comes in as a secret, never a layer: --secret id=pip_cert,src=/path/ca.pem
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu

FROM ${BASE_IMAGE}
ARG TORCH_SPEC=torch==2.13.0
ARG VLMLAB_GIT_SHA=""
LABEL org.opencontainers.image.title="vlmlab" org.opencontainers.image.revision="${VLMLAB_GIT_SHA}"
USER 0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HOME=/tmp/hf \
    MPLCONFIGDIR=/tmp/matplotlib \
    VLMLAB_GIT_SHA=${VLMLAB_GIT_SHA}

# dependencies first (pinned by constraints.txt), so a source change does not reinstall them
COPY pyproject.toml constraints.txt /opt/vlmlab/
# torch is pinned by TORCH_SPEC, everything else by constraints.txt
# hadolint ignore=DL3013
RUN --mount=type=bind,source=wheels,target=/wheels \
    --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv "$VIRTUAL_ENV" \
    && pip install --find-links /wheels "$TORCH_SPEC" \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/opt/vlmlab/pyproject.toml", "rb"))["project"]["dependencies"]))' \
       > /tmp/requirements.txt \
    && pip install -c /opt/vlmlab/constraints.txt -r /tmp/requirements.txt \
    && rm -rf /tmp/requirements.txt /root/.cache

COPY README.md /opt/vlmlab/
COPY runtime /opt/vlmlab/runtime
COPY harness /opt/vlmlab/harness
COPY stages /opt/vlmlab/stages
COPY evals /opt/vlmlab/evals
COPY configs /opt/vlmlab/configs
RUN --mount=type=secret,id=pip_cert \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install --no-deps -e /opt/vlmlab \
    && harness --help > /dev/null \
    && (getent passwd 1000 > /dev/null || useradd --create-home --uid 1000 --shell /bin/bash vlmlab) \
    && mkdir -p /work && chown 1000:1000 /work

# The runtime user gets no sudo: rayproject/ray makes uid 1000 (`ray`) a passwordless sudoer (its base-deps
# Dockerfile appends `ray ALL=NOPASSWD: ALL` to /etc/sudoers). Purging the package removes the binary and that file
# (SUDO_FORCE_REMOVE: Debian's and Ubuntu's sudo refuses removal while root has no password, as in an image); the
# check fails the build on any base where a sudo is left (one dpkg does not know of, say).
RUN if dpkg -s sudo > /dev/null 2>&1; then SUDO_FORCE_REMOVE=yes dpkg --purge sudo > /dev/null; fi \
    && if command -v sudo; then echo "sudo is still in the image: remove it" >&2; exit 1; fi

USER 1000
WORKDIR /work
CMD ["harness", "--help"]
