# One image for everything the pipeline runs: Airflow (api-server, scheduler, dag-processor,
# triggerer), the Spark jobs (spark-submit, local or as a cluster client) and the PyTorch steps
# (train/score, on a GPU when the container gets one).
#
#   docker build -t fraud-nightly:latest .                      # CUDA build of torch (default)
#   docker build --build-arg TORCH_INDEX=cpu -t fraud-nightly:cpu .   # CPU-only, smaller

# Spark's S3 connector, from the one pinned list `make venv` uses too (deploy/spark-jars/pom.xml).
FROM python:3.11-slim AS spark-jars
RUN apt-get update \
    && apt-get install -y --no-install-recommends maven openjdk-17-jdk-headless \
    && rm -rf /var/lib/apt/lists/*
COPY deploy/spark-jars/pom.xml /build/pom.xml
RUN mvn -q -B -f /build/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory=/build/jars

FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# PyTorch wheel index: cu128 (CUDA 12.8 runtime bundled in the wheels; needs an NVIDIA driver on
# the host and the NVIDIA container toolkit) or cpu.
ARG TORCH_INDEX=cu128
ARG AIRFLOW_UID=50000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    AIRFLOW_HOME=/opt/airflow \
    FRAUD_HOME=/opt/fraud \
    PYTHONPATH=/opt/fraud \
    PYSPARK_PYTHON=/usr/local/bin/python \
    PYSPARK_DRIVER_PYTHON=/usr/local/bin/python \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/fraud/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/opt/fraud/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False

# Spark needs a JRE (and `ps`); tini reaps the children of Spark and Airflow.
RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps tini curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/fraud

# torch first, from PyTorch's own index (the CUDA build); then the pinned rest, which finds
# torch==${TORCH_VERSION} already satisfied.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}"
COPY requirements.txt constraints.txt ./
RUN pip install -r requirements.txt -c constraints.txt
# The S3 jars go where pyspark keeps Spark's own: the classpath of spark-submit, local mode and
# the standalone master and worker started from this image.
COPY --from=spark-jars /build/jars/ /tmp/spark-jars/
RUN cp /tmp/spark-jars/*.jar "$(python -c 'import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), "jars"))')" \
    && rm -rf /tmp/spark-jars
# Airflow's metadata database in docker-compose is PostgreSQL (the local set-up uses SQLite).
RUN pip install "psycopg2-binary==2.9.10"

COPY jobs ./jobs
COPY dags ./dags
COPY plugins ./plugins
COPY deploy ./deploy

RUN useradd --uid "${AIRFLOW_UID}" --create-home airflow \
    && mkdir -p "${AIRFLOW_HOME}" /data/lake \
    && chown -R airflow "${AIRFLOW_HOME}" /data
USER airflow

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["airflow", "version"]
