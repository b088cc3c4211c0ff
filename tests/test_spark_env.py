"""The Spark toolchain agrees with itself: the JVM, pyspark and pyspark-client, and Python workers.

A Python UDF and ``mapInArrow`` start Python worker processes that talk to the JVM, which is where a
pyspark / pyspark-client version mismatch (both are installed, the Airflow Spark provider pulls in
the client) or a wrong ``PYSPARK_PYTHON`` shows up. The jobs themselves use no Python UDFs.
"""

from __future__ import annotations

from importlib.metadata import version

import pyarrow as pa
import pyarrow.compute as pc
import pyspark
import pytest
from pyspark.sql import functions as F
from pyspark.sql import types as T

pytestmark = pytest.mark.spark


def test_pyspark_and_pyspark_client_versions_match_the_jvm(spark):
    assert version("pyspark") == version("pyspark-client") == pyspark.__version__
    assert spark.version == pyspark.__version__


def test_python_udf_and_map_in_arrow_run_on_the_shared_session(spark):
    frame = spark.range(4).select(F.col("id").cast("long").alias("x"))

    plus_one = F.udf(lambda x: x + 1, T.LongType())
    assert [r.y for r in frame.select(plus_one("x").alias("y")).orderBy("y").collect()] == [1, 2, 3, 4]

    def doubled(batches):
        for batch in batches:
            yield pa.RecordBatch.from_arrays([pc.multiply(batch.column("x"), 2)], names=["x"])

    result = frame.mapInArrow(doubled, "x long").orderBy("x").collect()
    assert [r.x for r in result] == [0, 2, 4, 6]


def test_a_plain_spark_submit_gets_the_install_s_driver_heap(tmp_path):
    """The documented commands (``spark-submit jobs/spark/clean.py ...``, no --driver-memory) run
    with the 4 GiB driver of the install's spark-defaults.conf (``make venv`` puts it in pyspark's
    conf folder), not Spark's own 1 GiB default, too small for a range run at scale."""
    import subprocess
    import sys
    from pathlib import Path

    probe = tmp_path / "heap.py"
    probe.write_text("from pyspark.sql import SparkSession\n"
                     "spark = SparkSession.builder.getOrCreate()\n"
                     "print('HEAP', spark.sparkContext._jvm.java.lang.Runtime.getRuntime().maxMemory())\n"
                     "spark.stop()\n")
    done = subprocess.run([str(Path(sys.executable).with_name("spark-submit")), "--master", "local[1]", str(probe)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    heap = int(next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("HEAP")))
    assert heap > 3.5 * 2**30, f"driver heap {heap / 2**30:.2f} GiB"
