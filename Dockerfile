# alphaengine: production image.
#   docker build -t alphaengine .
#   docker run --env-file .env --stop-timeout 45 alphaengine        (or: docker compose up, see compose.yaml)
#
# The builder and the runtime start from the same base, so the virtual environment copied from one to the
# other finds its interpreter at the same path (/usr/local/bin/python3.11). Pin by digest as well
# (python:3.11-slim-bookworm@sha256:...) where builds must be bit-for-bit repeatable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the locked dependencies and a wheel of the project, installed into /opt/venv ---------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv

WORKDIR /src
# The dependencies first, in a layer of their own that a change to the sources does not invalidate.
# requirements.lock (`make lock`) pins every runtime dependency, transitive ones included, to one version
# with its hashes: pip refuses a file whose hash differs and any dependency the lock does not pin, so
# every build installs the same set. All of them ship manylinux wheels (numpy, pyarrow, polars, chdb,
# jaxlib, uvloop, orjson, msgspec, psutil, ...): no compiler, no source build.
COPY requirements.lock ./
RUN /opt/venv/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock

# hatchling needs README.md (the package's long description) besides the sources.
COPY pyproject.toml README.md ./
COPY src ./src

# Building a wheel first installs exactly what a release would ship; --no-deps, so that nothing outside
# the lock is added.
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --no-deps /wheels/*.whl \
    && /opt/venv/bin/pip check

# -- runtime ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# A fixed uid/gid, so that volume ownership is the same on every host and in every rebuild.
RUN groupadd --system --gid 10001 alphaengine \
    && useradd --system --uid 10001 --gid alphaengine --home-dir /var/lib/alphaengine \
        --no-create-home --shell /usr/sbin/nologin alphaengine \
    && install -d -o alphaengine -g alphaengine -m 0750 /var/lib/alphaengine

COPY --from=builder /opt/venv /opt/venv
COPY config/prod.toml /etc/alphaengine/prod.toml

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ALPHAENGINE_DATA_DIR=/var/lib/alphaengine

# The Kafka spill journal and the admin socket live here (config/prod.toml); the directory is created
# above with the right owner before VOLUME, so a new named volume inherits that ownership.
VOLUME ["/var/lib/alphaengine"]
WORKDIR /var/lib/alphaengine
# Numeric, so that a runtime (Kubernetes runAsNonRoot) can verify the user is not root without /etc/passwd.
USER 10001:10001

# Prometheus /metrics ([metrics] port in config/prod.toml).
EXPOSE 9464

# Ask the engine itself over its admin socket: healthy only once every module is RUNNING or DEGRADED.
# The check reads the same configuration, hence the same environment, as the engine.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["alphaengine", "admin", "--config", "/etc/alphaengine/prod.toml", "health"]

# SIGTERM starts the graceful stop (drain, flush, commit) that must end within [engine] stop_deadline_s
# (30 s in prod.toml): give the container more than that before SIGKILL (--stop-timeout, or
# stop_grace_period in compose.yaml).
STOPSIGNAL SIGTERM
ENTRYPOINT ["alphaengine"]
CMD ["run", "--config", "/etc/alphaengine/prod.toml"]
