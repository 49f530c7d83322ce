# The node as a container: `docker build -t paraspinal-node .`
#   docker run -p 11112:11112 -v /srv/paraspinal:/var/lib/paraspinal paraspinal-node           (node: serve)
#   docker run -v $PWD/in:/in -v $PWD/out:/out paraspinal-node run -i /in -o /out            (batch)
# The same application is packaged as a MAP with `monai-deploy package` (see app.yaml).
FROM python:3.11-slim-bookworm

# CPU torch by default; pass --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 for CUDA.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update && apt-get install -y --no-install-recommends dcmtk && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/paraspinal
COPY requirements.txt .
RUN pip install --extra-index-url "$TORCH_INDEX" -r requirements.txt

COPY app app
COPY operators operators
COPY paraspinal paraspinal
COPY config config
COPY models models
COPY __main__.py .

# Non-root: the node needs no privilege (DICOM port above 1024 by default).
RUN useradd --system --uid 10001 --home /var/lib/paraspinal paraspinal \
    && mkdir -p /var/lib/paraspinal && chown paraspinal /var/lib/paraspinal
USER paraspinal
WORKDIR /var/lib/paraspinal
ENV PYTHONPATH=/opt/paraspinal HOLOSCAN_MODEL_PATH=/opt/paraspinal/models

EXPOSE 11112
# Healthy: the node's heartbeat (written every 5 s) is fresh and its listener answers a C-ECHO
# from the health-check AE title (over TLS when the listener uses TLS). Exit 0/1.
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python", "-m", "app", "status", "--health"]
# SIGTERM (docker stop): the node stops accepting, gives open associations and running analyses
# node.shutdown_grace_s (default 8 s) to finish, and persists the rest; give docker stop at least
# that long (its default is 10 s: `docker stop -t 30` for a longer grace).
STOPSIGNAL SIGTERM
# Holoscan wants a 32 MB stack.
ENTRYPOINT ["/bin/sh", "-c", "ulimit -s 32768; exec python -m app \"$@\"", "--"]
CMD ["serve"]
