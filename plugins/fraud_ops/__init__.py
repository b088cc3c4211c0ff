"""Operators, sensors, gates and callbacks of the fraud pipeline (Airflow side only).

Nothing here imports Spark or torch; lake access goes through ``jobs.common.lake`` inside
``execute``/``poke`` so that parsing the DAG does no I/O.
"""
