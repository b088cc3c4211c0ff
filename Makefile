# Nightly card-fraud pipeline. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
export PYSPARK_PYTHON := $(CURDIR)/$(PY)
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(PY)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help venv test test-fast lint run up bench quality clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --upgrade pip 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	set -o pipefail; $(PY) -m pip install -q -r requirements.txt -c constraints.txt 2>&1 | { grep -v 'is ignored: it is neither' || true; }
	$(PY) -m pip install -q --no-deps -e .  # the jobs package importable from anywhere (spark-submit of a job file)
	touch $(STAMP)

# Spark's S3 connector (hadoop-aws and the AWS SDK bundle, pinned in deploy/spark-jars/pom.xml), put
# in pyspark's jars folder: the classpath of local Spark, spark-submit and a standalone cluster; and
# the install's spark-defaults.conf (deploy/spark-conf), what a plain spark-submit starts with.
JARS := $(VENV)/.spark-jars
$(JARS): $(STAMP) deploy/spark-jars/pom.xml deploy/spark-conf/spark-defaults.conf
	home=$$($(PY) -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))') \
		&& mvn -q -B -f deploy/spark-jars/pom.xml dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$$home/jars" \
		&& mkdir -p "$$home/conf" && cp deploy/spark-conf/spark-defaults.conf "$$home/conf/"
	touch $(JARS)

venv: $(STAMP) $(JARS) ## create .venv, install the pinned requirements and Spark's S3 jars (only when missing or changed)

test: $(STAMP) $(JARS) ## install if needed, then run the whole test suite
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder  # two workers, a file each; the scheduler tests (first in order) mostly wait

test-fast: $(STAMP) $(JARS) ## the suite without the slow (Airflow scheduler, S3 server) tests
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

lint: $(STAMP) ## ruff
	$(PY) -m ruff check .

run: $(STAMP) $(JARS) ## the main job: demo lake, then the nightly pipeline for one date (DATE=YYYY-MM-DD)
	$(PY) -m jobs.demo $(if $(DATE),--date $(DATE))

up: $(STAMP) $(JARS) ## start Airflow and a warm Spark locally, the DAG ready in the UI (PROFILE=celery: PostgreSQL, Redis, Celery; SPARK=submit: spark-submit per step)
	$(PY) deploy/local_airflow.py $(if $(PROFILE),--profile $(PROFILE)) $(if $(SPARK),--spark $(SPARK))

QUALITY_LAKE ?= file://$(CURDIR)/.quality-lake
QUALITY_LAKE_REALISTIC ?= file://$(CURDIR)/.quality-lake-realistic
quality: $(STAMP) $(JARS) ## reference-protocol quality report, fixed and realistic label delays (generates both lakes once, ~30 min)
	$(PY) -m jobs.torch.quality --lake $(QUALITY_LAKE) --realistic-lake $(QUALITY_LAKE_REALISTIC) --generate \
		--json .quality-lake/quality.json

bench: $(STAMP) $(JARS) ## benchmarks (prints tables, writes bench/RESULTS.md)
	$(PY) -m bench

clean: ## remove the demo lake and run state (keeps .venv)
	rm -rf .lake .quality-lake .quality-lake-realistic .airflow .airflow-celery .spark-connect .work spark-warehouse metastore_db derby.log
