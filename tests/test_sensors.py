"""The lake sensors in their default, deferrable mode: a sensor whose inputs are there finishes in
the task; one that waits hands the wait to a trigger that looks at the lake in the triggerer's event
loop and fires when the partition lands, or when the wait times out, saying what never came."""

from __future__ import annotations

import asyncio
import posixpath
import sys
from datetime import date
from pathlib import Path

import pytest

from jobs.common.datasets import Dataset
from jobs.common.lake import SUCCESS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

D = date(2018, 4, 20)


@pytest.fixture(autouse=True)
def no_label_feed(monkeypatch):
    monkeypatch.setenv("FRAUD_LABEL_FEED", "off")  # the landing sensor waits for the transactions' marker only


def _land(lake) -> None:
    folder = lake.partition_path(Dataset.LANDING, D)
    lake.fs.create_dir(folder, recursive=True)
    with lake.fs.open_output_stream(posixpath.join(folder, SUCCESS)) as f:
        f.write(b"")


def _sensor(lake):
    from fraud_ops.sensors import LandingSensor

    return LandingSensor(task_id="wait_for_landing", lake=lake.uri, day=D.isoformat(), poke_interval=0.05, timeout=30)


def _events(trigger, limit: float = 10.0) -> list:
    async def first():
        async for event in trigger.run():
            return event.payload
        return None

    return [asyncio.run(asyncio.wait_for(first(), limit))]


def test_a_sensor_with_its_inputs_there_does_not_defer(lake):
    _land(lake)
    assert _sensor(lake).execute({}) is None


def test_a_waiting_sensor_defers_to_a_lake_trigger_that_fires_when_the_partition_lands(lake):
    from airflow.sdk.exceptions import TaskDeferred
    from fraud_ops.triggers import LakeWaitTrigger

    sensor = _sensor(lake)
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, LakeWaitTrigger) and deferred.value.method_name == "resume"
    classpath, kwargs = trigger.serialize()
    assert classpath == "fraud_ops.triggers.LakeWaitTrigger"
    again = LakeWaitTrigger(**kwargs)  # what the triggerer rebuilds from the database
    assert again.serialize() == (classpath, kwargs)

    async def land_later():
        await asyncio.sleep(0.3)
        await asyncio.to_thread(_land, lake)

    async def wait_and_land():
        lander = asyncio.create_task(land_later())
        async for event in again.run():
            await lander
            return event.payload

    assert asyncio.run(asyncio.wait_for(wait_and_land(), 10)) == {"status": "done"}
    assert sensor.resume({}, {"status": "done"}) is None


def test_a_wait_that_times_out_fails_naming_what_never_came(lake):
    from airflow.sdk.exceptions import AirflowSensorTimeout, TaskDeferred

    sensor = _sensor(lake)
    sensor.timeout = 0.2
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute({})
    [event] = _events(deferred.value.trigger)
    assert event["status"] == "timeout" and "no _SUCCESS" in event["message"] and "landing/transactions" in event["message"]
    with pytest.raises(AirflowSensorTimeout, match="no _SUCCESS"):
        sensor.resume({}, event)


def test_the_other_modes_are_still_there_and_a_bad_one_is_refused(lake, monkeypatch):
    from fraud_ops.config import orchestration
    from fraud_ops.sensors import LandingSensor

    reschedule = LandingSensor(task_id="w", lake=lake.uri, day=D.isoformat(), mode="reschedule")
    assert reschedule.mode == "reschedule" and not reschedule.deferrable
    assert orchestration().sensor_mode == "deferrable"
    monkeypatch.setenv("FRAUD_SENSOR_MODE", "sometimes")
    with pytest.raises(ValueError, match="FRAUD_SENSOR_MODE"):
        orchestration()
