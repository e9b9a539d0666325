# kdflow training image: Ray 2.60 (Python 3.11) with kdflow and its pinned dependencies
# baked in (a runtime_env pip install hangs on clusters without egress).
#   docker build -f docker/train.Dockerfile -t kdflow/train:0.1.0 .
#   docker build -f docker/train.Dockerfile --build-arg RAY_TAG=2.60.0-py311-cpu -t kdflow/train:0.1.0-cpu .
ARG RAY_TAG=2.60.0-py311-gpu
FROM rayproject/ray:${RAY_TAG}

# The ray image's user is `ray` (uid 1000, gid 100); its Python lives in ~/anaconda3.
USER 1000:100
WORKDIR /home/ray/kdflow

# Dependencies first (cached layer): the exact versions of docker/requirements.lock
# (pip adds only what the lock cannot list, e.g. the CUDA wheels torch needs on GPU).
COPY --chown=1000:100 docker/requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir -r /tmp/requirements.lock \
    && rm /tmp/requirements.lock

# kdflow itself (no dependency resolution: everything is pinned above), plus the
# ray-job entrypoints and example configs.
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 kd ./kd
COPY --chown=1000:100 workflows ./workflows
COPY --chown=1000:100 configs ./configs
RUN pip install --no-cache-dir --no-deps . \
    && kd --help > /dev/null \
    && python -c "import ray, torch, mlflow, kubernetes; assert ray.__version__ == '2.60.0', ray.__version__"

ENV PYTHONUNBUFFERED=1 \
    RAY_TRAIN_V2_ENABLED=1
