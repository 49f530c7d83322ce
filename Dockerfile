# The paraspinal node as a container (research software, not a medical device).
#
#   docker build --network host -t paraspinal-node .          # CPU flavour (default)
#   docker run -d --name paraspinal -p 11112:11112 -v /srv/paraspinal:/var/lib/paraspinal paraspinal-node
#   docker run --rm -v $PWD/in:/in:ro -v $PWD/out:/out --user "$(id -u):$(id -g)" paraspinal-node run -i /in -o /out
#
# Build arguments:
#   BASE_IMAGE   a Debian bookworm image with python3 (3.11) and python3-venv; default the slim
#                Python image from Docker Hub. A site without Docker Hub names its own registry's
#                copy, e.g. --build-arg BASE_IMAGE=registry.example.org/python:3.11-slim-bookworm.
#   FLAVOUR      cpu (default): CPU torch 2.13.0+cpu, from wheels/ or TORCH_INDEX; the build fails
#                if that torch has CUDA (torch.version.cuda must be None), so a fallback to PyPI's
#                CUDA torch cannot slip in.
#                gpu: PyPI's torch 2.13.0 with its CUDA libraries (several GB more); run it with the
#                NVIDIA container toolkit (`docker run --gpus all ...`) and `--device cuda` or the
#                default (CUDA when available). Not built by CI (no GPU, no CUDA wheels offline).
#   TORCH_INDEX  index for the CPU wheel when wheels/ holds none (default download.pytorch.org).
#   CUDA_RUNTIME the CUDA 13 runtime wheel Holoscan needs (libcudart.so.13), in both flavours:
#                holoscan-cu13 imports it even on CPU.
# Local inputs (see their README.md): wheels/ (local wheel folder, used first) and certs/
# (extra CA certificates, e.g. a corporate or TLS-inspecting proxy CA, trusted by pip and the image).
# The build context is filtered by .dockerignore (no .venv, .git, tests or build output).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG FLAVOUR=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG CUDA_RUNTIME=nvidia-cuda-runtime==13.0.96

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Extra CAs first: everything below may go through a TLS-inspecting proxy.
COPY certs/ /usr/local/share/ca-certificates/site/
RUN set -eu; \
    if ls /usr/local/share/ca-certificates/site/*.crt >/dev/null 2>&1; then update-ca-certificates >/dev/null; fi; \
    test -f /etc/ssl/certs/ca-certificates.crt; \
    python3 -m venv /opt/venv

COPY wheels/ /tmp/wheels/
COPY requirements-runtime.txt /tmp/requirements-runtime.txt
# pip trusts the system store (with certs/), not its own bundle.
RUN set -eu; \
    export PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_FIND_LINKS=/tmp/wheels; \
    case "$FLAVOUR" in \
      cpu) if ls /tmp/wheels/torch-"$TORCH_VERSION"+cpu-*.whl >/dev/null 2>&1; then \
             pip install "torch==$TORCH_VERSION+cpu"; \
           else pip install --extra-index-url "$TORCH_INDEX" "torch==$TORCH_VERSION+cpu"; fi; \
           python -c "import torch; assert torch.version.cuda is None, 'CPU flavour got a CUDA torch: ' + torch.__version__" ;; \
      gpu) pip install "torch==$TORCH_VERSION"; \
           python -c "import torch; assert torch.version.cuda, 'GPU flavour got a CPU torch: ' + torch.__version__" ;; \
      *) echo "FLAVOUR must be cpu or gpu, not $FLAVOUR" >&2; exit 2 ;; \
    esac; \
    pip freeze | grep '^torch==' > /tmp/torch-constraint.txt; \
    pip install -c /tmp/torch-constraint.txt -r /tmp/requirements-runtime.txt "$CUDA_RUNTIME"; \
    python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; \
    # Holoscan dlopens libcudart.so.13: register the wheel's library folder with the loader.
    python -c "import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], 'lib'))" \
        > /etc/ld.so.conf.d/nvidia-cuda-runtime.conf; \
    ldconfig; ldconfig -p | grep -q 'libcudart.so.13'; \
    # holoscan-cu13 creates its library links in site-packages on first import: do it now, as
    # root, so the runtime user (read-only site-packages) can import it.
    (ulimit -s 32768; python -c "import holoscan.core; print('holoscan', holoscan.__version__)"); \
    rm -rf /tmp/wheels /tmp/torch-constraint.txt /tmp/requirements-runtime.txt /root/.cache

WORKDIR /opt/paraspinal
COPY app app
COPY operators operators
COPY paraspinal paraspinal
COPY config config
COPY models models
COPY __main__.py .
COPY container/entrypoint.sh /usr/local/bin/paraspinal-entrypoint

# Non-root: the node needs no privilege (DICOM port above 1024). /var/lib/paraspinal is the
# state volume (spool, database, results); HOME is world-writable (sticky) so that any
# --user has one for caches. USER/LOGNAME: getpass.getuser() (MONAI) fails for a uid
# without a passwd entry otherwise.
RUN useradd --system --uid 10001 --user-group --home-dir /home/paraspinal paraspinal \
    && mkdir -p /var/lib/paraspinal /home/paraspinal \
    && chown paraspinal:paraspinal /var/lib/paraspinal && chmod 0775 /var/lib/paraspinal \
    && chmod 1777 /home/paraspinal \
    && python -m compileall -q /opt/paraspinal
USER 10001:10001
ENV HOME=/home/paraspinal USER=paraspinal LOGNAME=paraspinal \
    PYTHONPATH=/opt/paraspinal HOLOSCAN_MODEL_PATH=/opt/paraspinal/models \
    PARASPINAL__NODE__BIND_ADDRESS=0.0.0.0
WORKDIR /var/lib/paraspinal
# Smoke test as the runtime user: the pipeline (Holoscan, MONAI Deploy, torch) imports, the
# model bundle loads on CPU, and the configuration is valid.
RUN ulimit -s 32768 && python -c "import app.application; from paraspinal.model_bundle import load_bundle; \
from app.config import load_config; load_config(); print('smoke test: model', load_bundle(__import__('pathlib').Path('/opt/paraspinal/models'), 'cpu').name)"

EXPOSE 11112
# Healthy: fresh heartbeat, the listener answers a C-ECHO from the health-check AE title (over
# TLS when the listener uses TLS), and at least one analysis worker has the pipeline and the
# model loaded. Exit 0/1; the one-line reason is in `docker inspect` (State.Health.Log).
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python", "-m", "app", "status", "--health"]
# SIGTERM (docker stop): the node stops accepting, gives open associations and running analyses
# node.shutdown_grace_s (default 8 s) to finish, and persists the rest; give docker stop at least
# that long (its default is 10 s: `docker stop -t 30` for a longer grace).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/paraspinal-entrypoint"]
CMD ["serve"]
