# Two images from one file, both from the same pinned base and the same pinned requirements:
#
#   docker build --target airflow -t fraud-nightly:latest .   the Airflow components and Celery worker,
#       the Spark jobs (Java 17, Spark's S3 jars: spark-submit locally or as a cluster client, and
#       the standalone master and worker), CPU torch, and the S3 server docker-compose runs (`weed`)
#   docker build --target trainer -t fraud-trainer:latest .   the GPU steps (train, score): CUDA torch,
#       run as the `gpu` queue's Celery worker, or by the docker and kubernetes torch runners
#
# Base images are pinned by digest. Refresh one with `docker buildx imagetools inspect <tag>`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# Spark's S3 connector, from the one pinned list `make venv` uses too (deploy/spark-jars/pom.xml).
FROM ${PYTHON_IMAGE} AS spark-jars
RUN apt-get update \
    && apt-get install -y --no-install-recommends maven openjdk-17-jdk-headless \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/spark-jars/pom.xml /build/pom.xml
RUN mvn -q -B -f /build/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=/build/jars

# What both images share: the interpreter, tini, the unprivileged user and the project's layout.
FROM ${PYTHON_IMAGE} AS base
ARG AIRFLOW_UID=50000
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow \
    FRAUD_HOME=/opt/fraud \
    PYTHONPATH=/opt/fraud \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/fraud/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/fraud/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    AIRFLOW__CORE__LAZY_LOAD_PLUGINS=False \
    NUMBA_CACHE_DIR=/opt/numba-cache
# tini reaps the children of Airflow and Spark; curl answers the healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini procps curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid "${AIRFLOW_UID}" --gid 0 --create-home airflow \
    && mkdir -p "${AIRFLOW_HOME}" /data "${NUMBA_CACHE_DIR}" \
    && chown -R "${AIRFLOW_UID}:0" "${AIRFLOW_HOME}" /data "${NUMBA_CACHE_DIR}"
WORKDIR /opt/fraud
ENTRYPOINT ["/usr/bin/tini", "--"]

FROM base AS airflow
ARG TORCH_VERSION=2.13.0
ENV JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    PYSPARK_PYTHON=/usr/local/bin/python \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*
# torch first, from PyTorch's own index (the CPU build here); then the pinned rest, which finds
# torch==${TORCH_VERSION} already satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt
# The S3 jars go where pyspark keeps Spark's own: the classpath of spark-submit, local mode and
# the standalone master and worker started from this image; the install's spark-defaults.conf (the
# driver heap of a plain spark-submit) into its conf folder, as `make venv` does.
COPY --from=spark-jars /build/jars/ /tmp/spark-jars/
COPY deploy/spark-conf/spark-defaults.conf /tmp/spark-defaults.conf
RUN home="$(python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')" \
    && cp /tmp/spark-jars/*.jar "$home/jars/" && mkdir -p "$home/conf" && mv /tmp/spark-defaults.conf "$home/conf/" \
    && rm -rf /tmp/spark-jars
COPY jobs ./jobs
COPY dags ./dags
COPY plugins ./plugins
COPY deploy ./deploy
USER airflow
# the sequence model's history loops compiled once here, into NUMBA_CACHE_DIR: the steps load them
RUN python -c "from jobs.torch.data import compile_history_loops; compile_history_loops()"
CMD ["airflow", "version"]

FROM base AS trainer
ARG TORCH_VERSION=2.13.0
# PyTorch wheel index: cu128 (the CUDA 12.8 runtime comes in the wheels; the host needs an NVIDIA
# driver and the NVIDIA container toolkit).
ARG TORCH_INDEX=cu128
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt
COPY jobs ./jobs
COPY dags ./dags
COPY plugins ./plugins
USER airflow
# the sequence model's history loops compiled once here, into NUMBA_CACHE_DIR: the steps load them
RUN python -c "from jobs.torch.data import compile_history_loops; compile_history_loops()"
CMD ["python", "-c", "import torch; print('cuda', torch.cuda.is_available())"]
