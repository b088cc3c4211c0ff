"""Training: determinism, checkpoint and export, lineage, and the promotion decisions of docs/contract.md ("Training, evaluation and promotion")."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from datetime import date, datetime, timedelta

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs.common.calendar import MICROS_PER_DAY, Calendar
from jobs.common.cli import EXIT_NO_CHAMPION, EXIT_WAITING
from jobs.common.lake import Dataset, Lake
from jobs.common.schema import (
    FEATURE_SCHEMA_VERSION,
    LABEL_EVENT_SCHEMA,
    MODEL_INPUTS,
    REPORTED_AT,
    customer_avg_amount,
)
from jobs.torch import data as D
from jobs.torch import registry as R
from jobs.torch import train
from jobs.torch.checkpoint import checkpoint_bytes, load_version, model_config
from jobs.torch.data import (
    TERMINAL_STEP,
    FeatureFrame,
    LabelEvents,
    TerminalRows,
    build_terminal_history,
    read_features,
    read_for_model,
)
from jobs.torch.fit import merge_ensemble
from jobs.torch.model import InputTransform, ModelConfig, build_model
from jobs.torch.predict import predict
from jobs.torch.synthetic import publish_synthetic, synthetic_features

FIRST = date(2018, 4, 1)
T1, T2 = date(2018, 4, 15), date(2018, 4, 22)
CAL = Calendar(FIRST)
FAST = ["--epochs", "2", "--hidden", "16", "--batch-size", "256"]


@pytest.fixture(autouse=True)
def schedule_env(monkeypatch):
    for name, value in {"FRAUD_FIRST_DATE": "2018-04-01", "FRAUD_TRAIN_EVERY_DAYS": "7",
                        "FRAUD_TRAIN_WINDOW_DAYS": "7", "FRAUD_SEED": "0", "FRAUD_PROMOTION_TOLERANCE": "0.005"}.items():
        monkeypatch.setenv(name, value)


def publish(lake: Lake, days: int = 15, rows: int = 400) -> None:
    for i in range(days):
        day = FIRST + timedelta(days=i)
        publish_synthetic(lake, day, synthetic_features(day, rows, cards=120))


def run_train(lake: Lake, day: date, *extra: str) -> int:
    return train.main(["--lake", lake.uri, "--date", day.isoformat(), *FAST, *extra])


def test_config_is_a_dataclass_filled_from_argv():
    cfg = train.TrainConfig.from_argv(["--date", "2018-04-15", "--model", "seq", "--hidden", "64", "32",
                                       "--epochs", "3", "--seed", "7", "--device", "cpu"])
    assert (cfg.model, cfg.hidden, cfg.epochs, cfg.seed, cfg.device, cfg.window_days) == ("seq", [64, 32], 3, 7, "cpu", 7)
    assert cfg.recipe_hash() != train.TrainConfig.from_argv(["--date", "2018-04-15"]).recipe_hash()


def test_the_gru_width_is_a_training_setting_and_a_stored_model_keeps_its_own():
    """8 by default, set by --seq-hidden, part of the recipe; a model stored 32 wide (the width before
    it was a setting) loads and scores 32 wide."""
    default = train.TrainConfig.from_argv(["--date", "2018-04-15", "--model", "seq"])
    wider = train.TrainConfig.from_argv(["--date", "2018-04-15", "--model", "seq", "--seq-hidden", "16"])
    assert (default.model_config().seq_hidden, wider.model_config().seq_hidden) == (8, 16)
    assert default.recipe_hash() != wider.recipe_hash()
    # a 32-wide seq and every MLP keep the recipe hash they had before the width was a setting
    # (their recipes are those fields without the width: it was not one of them)
    before = {f.name for f in fields(train.TrainConfig)} - {"lake", "date", "device", "threads", "seq_hidden"}
    for argv in (["--model", "seq", "--seq-hidden", "32"], ["--model", "mlp"]):
        assert set(train.TrainConfig.from_argv(["--date", "2018-04-15", *argv]).recipe()) == before
    assert set(default.recipe()) == before | {"seq_hidden"}
    assert build_model(default.model_config()).gru.hidden_size == 8
    old = replace(default.model_config(), seq_hidden=32)
    x = torch.rand(64, len(MODEL_INPUTS)) * 10
    ckpt = checkpoint_bytes(default.recipe(), model_config(old.to_dict()), build_model(old).eval(), InputTransform.fit(x))
    loaded = load_version(ckpt, "seq-32")
    assert loaded.config.seq_hidden == 32 and loaded.scorer.model.gru.hidden_size == 32


def test_training_is_deterministic_on_cpu_and_writes_a_complete_version(tmp_path):
    lakes = [Lake.from_uri((tmp_path / name).as_uri()) for name in ("a", "b")]
    for lake in lakes:
        publish(lake, days=7)
        assert run_train(lake, T1) == 0
    champions = [R.Registry(lake).champion_as_of(T1) for lake in lakes]
    version = champions[0]["version"]
    assert version == champions[1]["version"]  # the name hashes the checkpoint bytes
    registry = R.Registry(lakes[0])
    blobs = [R.Registry(lake).read_file(version, R.CHECKPOINT) for lake in lakes]
    assert blobs[0] == blobs[1]

    ckpt = torch.load(io.BytesIO(blobs[0]), weights_only=True)
    assert ckpt["features"] == list(MODEL_INPUTS)
    assert ckpt["feature_schema_version"] == FEATURE_SCHEMA_VERSION
    assert set(ckpt) >= {"state_dict", "model", "scaler_mean", "scaler_std"}

    lineage = json.loads(registry.read_file(version, R.LINEAGE))
    assert [i["date"] for i in lineage["inputs"]] == [(FIRST + timedelta(days=i)).isoformat() for i in range(7)]
    assert all(i["digest"] == lake.digest(Dataset.FEATURES, date.fromisoformat(i["date"]))
               for lake in lakes[:1] for i in lineage["inputs"])
    assert lineage["code_version"].startswith("sha256:") and lineage["seed"] == 0
    metrics = json.loads(registry.read_file(version, R.METRICS))
    assert metrics["train"]["rows"] == 7 * 400

    decision = registry.decision(T1)
    assert decision["outcome"] == R.PROMOTED and decision["champion"] == version
    assert "first champion" in decision["reason"]
    # a rerun finds the decision recorded with the same configuration: nothing to do
    assert run_train(lakes[0], T1) == 0
    assert registry.decision(T1) == decision


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_exported_program_scores_like_the_checkpoint_without_project_code(lake, tmp_path, kind):
    publish(lake, days=7)
    assert run_train(lake, T1, "--model", kind) == 0
    registry = R.Registry(lake)
    version = registry.champion_as_of(T1)["version"]
    loaded = load_version(registry.read_file(version, R.CHECKPOINT), version)
    assert loaded.config.kind == kind
    day = FIRST + timedelta(days=2)
    if kind == "seq":  # the program takes the history as tensors: rows, previous rows, gaps, presence, terminal rows
        frame, history = read_for_model(lake, [day], loaded.config, CAL)
        present = history.prev >= 0
        inputs = [frame.x, history.pool[np.maximum(history.prev, 0)], history.gap_days, present.astype(np.float32),
                  history.terminal]
        assert present.any() and not present.all()  # some rows have history, some do not
        assert loaded.config.terminal_len == history.terminal.shape[1] == 5
    else:
        frame, history = read_features(lake, [day]), None
        inputs = [frame.x]
    expected = predict(loaded, frame, history)
    for i, array in enumerate(inputs):
        np.save(tmp_path / f"in{i}.npy", array)
    (tmp_path / "model.pt2").write_bytes(registry.read_file(version, R.EXPORT))
    code = ("import numpy as np, torch; p = torch.export.load('model.pt2').module(); "
            f"args = [torch.from_numpy(np.load(f'in{{i}}.npy')) for i in range({len(inputs)})]; "
            "print(repr(p(*args).detach().double().numpy().tolist()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = np.array(eval(out.stdout))  # noqa: S307 - our own subprocess's repr of a float list
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_decisions_wait_in_date_order_then_compare_with_the_champion(lake):
    publish(lake, days=15)
    assert run_train(lake, T2) == EXIT_WAITING  # T1 not decided yet
    assert R.Registry(lake).decision(T2) is None
    assert run_train(lake, T1) == 0
    assert run_train(lake, T2) == 0
    registry = R.Registry(lake)
    d1, d2 = registry.decision(T1), registry.decision(T2)
    assert d2["outcome"] == R.PROMOTED and d2["previous_champion"] == d1["champion"]
    val = d2["validation"]
    assert val["week"][0] == "2018-04-08" and val["week"][-1] == "2018-04-14"
    # the same configuration on the window ending T-15 is the T1 champion itself (reused, not retrained)
    assert val["candidate_version"] == d1["champion"]
    assert val["candidate"]["average_precision"] == val["champion"]["average_precision"]
    assert d2["champion"] != d1["champion"]
    assert registry.champion_as_of(T2 - timedelta(days=1))["version"] == d1["champion"]
    assert registry.champion_as_of(T2)["version"] == d2["champion"]


def test_a_label_event_arriving_after_a_training_day_retrains_the_validation_model(lake):
    """The validation model of T2 is the configuration on the window ending T2-15 with the labels as
    known on T2. T1's candidate had that window with the labels known on T1: it is reused only while
    no label of the window changed in between."""
    publish(lake, days=15)
    assert run_train(lake, T1) == 0
    first_champion = R.Registry(lake).decision(T1)["champion"]
    clean = lake.read_table(Dataset.CLEAN, FIRST + timedelta(days=2))  # in T1's window, 04-01 .. 04-07
    row = clean.slice(clean.num_rows // 2, 1).to_pylist()[0]  # a transaction of the validation window
    arrived = T1 + timedelta(days=2)  # reported between the two training days: flipping its label
    event = {"TRANSACTION_ID": row["TRANSACTION_ID"], "TX_FRAUD": 1 - row["TX_FRAUD"],
             REPORTED_AT: datetime(arrived.year, arrived.month, arrived.day, 10),
             **{name: row[name] for name in ("TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID")}}
    lake.write_table(Dataset.CLEAN_LABELS, arrived, pa.Table.from_pylist([event], LABEL_EVENT_SCHEMA))
    assert run_train(lake, T2) == 0
    registry = R.Registry(lake)
    validation = registry.decision(T2)["validation"]["candidate_version"]
    assert validation != first_champion  # retrained, with the event: not T1's candidate
    assert registry.version(validation)["training_key"] != registry.version(first_champion)["training_key"]
    lineages = [json.loads(registry.read_file(v, R.LINEAGE)) for v in (first_champion, validation)]
    assert [lin["labels_as_of"] for lin in lineages] == [T1.isoformat(), T2.isoformat()]
    assert lineages[0]["labels_sha256"] != lineages[1]["labels_sha256"]
    assert lineages[0]["window"] == lineages[1]["window"]


def test_a_worse_configuration_is_refused(lake):
    publish(lake, days=15, rows=600)
    assert train.main(["--lake", lake.uri, "--date", T1.isoformat(), "--epochs", "4", "--hidden", "32"]) == 0
    champion = R.Registry(lake).decision(T1)["champion"]
    # zero epochs: an untrained network scores the validation week much worse than the champion
    assert run_train(lake, T2, "--epochs", "0") == 0
    d2 = R.Registry(lake).decision(T2)
    assert d2["outcome"] == R.REFUSED and d2["champion"] == champion
    assert d2["validation"]["candidate"]["average_precision"] < d2["validation"]["champion"]["average_precision"]
    statuses = {v["version"]: v["status"] for v in R.Registry(lake).versions()}
    assert statuses[champion] == "champion" and statuses[d2["candidate"]["version"]] == "refused"


def publish_days(lake: Lake, days: list[date], fraud_rate: float, rows: int = 400) -> None:
    for day in days:
        publish_synthetic(lake, day, synthetic_features(day, rows, cards=120, fraud_rate=fraud_rate))


def test_a_fraud_free_training_window_promotes_nothing_and_says_why(lake):
    publish_days(lake, CAL.span(T1, 14, 0), fraud_rate=0.0)  # T1's window (04-01 .. 04-07) has no fraud
    assert run_train(lake, T1) == 0
    registry = R.Registry(lake)
    decision = registry.decision(T1)
    assert decision["outcome"] == R.REFUSED and decision["champion"] is None
    assert decision["reason"].startswith("refused: no evidence (0 fraud labels in the training window, minimum 10")
    assert decision["evidence"] == {"training_window": 0, "validation_week": None, "minimum": 10}
    assert registry.versions() == []  # nothing was trained
    assert registry.champion_as_of(T1) is None  # the next days score nothing and go on
    from jobs.torch import score

    assert score.main(["--lake", lake.uri, "--date", T1.isoformat()]) == EXIT_NO_CHAMPION


def test_a_fraud_free_validation_week_keeps_the_champion_and_says_why(lake, monkeypatch):
    # a 14-day window: the training window (ending T-8) then reaches beyond the validation week (T-14 .. T-8)
    monkeypatch.setenv("FRAUD_TRAIN_WINDOW_DAYS", "14")
    first, later = date(2018, 4, 22), date(2018, 4, 29)
    cal = Calendar(FIRST, train_window_days=14)
    assert cal.schedule.first_training_day == first and cal.schedule.previous_training_day(later) == first
    validation_week = set(cal.validation_week(later))
    for day in cal.span(later, 28, 1):  # frauds everywhere but in the later day's validation week
        publish_days(lake, [day], fraud_rate=0.0 if day in validation_week else 0.03)
    assert run_train(lake, first) == 0
    registry = R.Registry(lake)
    champion = registry.decision(first)["champion"]
    assert champion is not None and registry.decision(first)["evidence"]["training_window"] >= 10
    assert run_train(lake, later) == 0
    decision = registry.decision(later)
    assert decision["outcome"] == R.REFUSED and decision["champion"] == champion
    assert decision["evidence"]["validation_week"] == 0 and decision["evidence"]["training_window"] >= 10
    assert "refused: no evidence (0 fraud labels in the validation week" in decision["reason"]
    assert registry.champion_as_of(later)["version"] == champion


def test_sequence_model_uses_the_cards_earlier_feature_rows(lake):
    publish(lake, days=8)
    target_day = FIRST + timedelta(days=7)
    frame, history = read_for_model(lake, [target_day], ModelConfig(kind="seq", seq_len=5, lookback_days=7), CAL)
    earlier = read_features(lake, [FIRST + timedelta(days=i) for i in range(7)])
    pool_card = np.concatenate([earlier.card, frame.card])
    pool_time = np.concatenate([earlier.time_us, frame.time_us])
    # the pool keeps exactly the rows some target looks back at, each as read
    source = history.pool_rows
    linked = history.prev >= 0
    assert np.array_equal(np.unique(history.prev[linked]), np.arange(len(history.pool)))
    assert len(history.pool) < 8 * 400 and np.array_equal(history.pool, np.concatenate([earlier.x, frame.x])[source])
    # 120 cards, 400 rows a day: every row has a previous row of its own card, earlier in time
    newest = source[history.prev[:, -1]]
    assert (history.prev[:, -1] >= 0).all()
    assert (pool_card[newest] == frame.card).all() and (pool_time[newest] <= frame.time_us).all()
    assert (pool_card[source[history.prev[linked]]] == np.broadcast_to(frame.card[:, None], linked.shape)[linked]).all()
    assert (np.diff(np.where(linked, history.gap_days, 1e9), axis=1) <= 0).all()  # oldest first
    assert (pool_time[newest] < frame.time_us.min()).any()  # history reaches earlier days
    assert run_train(lake, date(2018, 4, 16), "--model", "seq", "--lookback-days", "1") == 0
    version = next(v for v in R.Registry(lake).versions() if v["model"] == "seq")
    assert version["train_day"] == "2018-04-16"  # not a training day: registered, no decision
    assert R.Registry(lake).decision(date(2018, 4, 16)) is None
    loaded = load_version(R.Registry(lake).read_file(version["version"], R.CHECKPOINT), version["version"])
    frame, history = read_for_model(lake, [target_day], loaded.config, CAL)
    scores = predict(loaded, frame, history)
    assert scores.shape == (len(frame),) and np.isfinite(scores).all()
    # the same scores from a row-major frame and a pool given whole (as other callers hold them)
    row_major = FeatureFrame(np.ascontiguousarray(frame.x), frame.label, frame.card, frame.time_us, frame.txid,
                             frame.terminal)
    whole = D.CardHistory.of_pool(history.pool, history.prev, history.gap_days, history.terminal)
    assert frame.x.strides[0] == frame.x.itemsize and history.pool_rows is not None
    np.testing.assert_allclose(predict(loaded, row_major, whole), scores, rtol=1e-6, atol=1e-9)
    program = torch.export.load(io.BytesIO(R.Registry(lake).read_file(version["version"], R.EXPORT))).module()
    k = loaded.config.seq_len
    prev = torch.from_numpy(history.pool)[torch.from_numpy(history.prev).clamp_min(0)]
    present = torch.from_numpy((history.prev >= 0).astype(np.float32))
    exported = program(torch.from_numpy(frame.x), prev, torch.from_numpy(history.gap_days), present,
                       torch.from_numpy(history.terminal))
    assert prev.shape[1] == k
    np.testing.assert_allclose(exported.detach().double().numpy(), scores, rtol=1e-5, atol=1e-6)


def _frame(rows: list[tuple]) -> FeatureFrame:
    """Rows ``(id, time_us, terminal, amount, label)`` as a FeatureFrame (card 0, 30-day average 10)."""
    ids, times, terminals, amounts, labels = (np.array(c) for c in zip(*rows, strict=True))
    x = np.zeros((len(rows), len(MODEL_INPUTS)), np.float32)
    x[:, MODEL_INPUTS.index("TX_AMOUNT")] = amounts
    x[:, MODEL_INPUTS.index(customer_avg_amount(30))] = 10.0
    return FeatureFrame(x, labels.astype(np.int8), np.zeros(len(rows), np.int64), times.astype(np.int64),
                        ids.astype(np.int64), terminals.astype(np.int64))


def inline(frame: FeatureFrame, delay_days: int = 7) -> LabelEvents:
    """The frame's labels as inline events: each reported the delay after its transaction."""
    return LabelEvents(frame.txid, frame.time_us + delay_days * MICROS_PER_DAY, frame.label)


def test_terminal_history_holds_only_matured_rows_of_the_same_terminal_oldest_first():
    us, day = 1, MICROS_PER_DAY
    t = 20 * day  # the scored transaction's time; the delay bound is t - 7 days, inclusive
    pool = _frame([
        (1, t - 9 * day, 5, 10.0, 1),
        (2, t - 8 * day, 5, 50.0, 0),
        (4, t - 7 * day, 5, 20.0, 1),  # exactly 7 days old: matured, inside (as in the terminal risk windows)
        (3, t - 7 * day, 5, 30.0, 0),  # same instant: ordered by transaction id, so before id 4
        (5, t - 7 * day + us, 5, 99.0, 1),  # one microsecond too young: its label is not known yet
        (6, t - 8 * day, 6, 99.0, 1),  # another terminal
        (7, t, 5, 99.0, 1),  # the scored row itself
    ])
    target = _frame([(7, t, 5, 99.0, 1), (8, t - 2 * day, 5, 1.0, 0), (9, t, 7, 1.0, 0)])
    hist = build_terminal_history(target, TerminalRows.of_frame(pool), k=3, delay_days=7, events=inline(pool))
    assert hist.shape == (3, 3, TERMINAL_STEP)
    label, log_amount, ratio, age, present = (hist[..., i] for i in range(TERMINAL_STEP))
    # row 7: the last three matured rows of terminal 5 are ids 2, 3, 4 (oldest first)
    np.testing.assert_array_equal(label[0], [0, 0, 1])
    np.testing.assert_allclose(log_amount[0] * 5, np.log1p([50.0, 30.0, 20.0]), rtol=1e-6)
    np.testing.assert_allclose(ratio[0], np.log1p([50.0, 30.0, 20.0]) - np.log1p(10.0), rtol=1e-6)
    np.testing.assert_allclose(np.expm1(age[0] * 3), [8, 7, 7], rtol=1e-5)
    np.testing.assert_array_equal(present[0], [1, 1, 1])
    # row 8 (2 days before t): only id 1 is 7 days older than it (exactly); the missing slots come first, as zeros
    np.testing.assert_array_equal(present[1], [0, 0, 1])
    np.testing.assert_array_equal(label[1], [0, 0, 1])
    assert not hist[1, :2].any()
    # row 9: terminal 7 has no history at all
    assert not hist[2].any()


def test_the_history_frame_is_filled_day_by_day_in_place_and_checked_against_the_manifests(tmp_path):
    """``read_frame`` sizes the frame from the manifests and copies each day into its place: the
    result equals the days read one by one and concatenated; a manifest whose row count does not
    match its files is refused with the day named, not read into a frame of the wrong size."""
    import posixpath

    from jobs.common.lake import MANIFEST
    from jobs.torch.data import read_frame

    lake = Lake.from_uri(tmp_path.as_uri())
    days = [FIRST + timedelta(days=i) for i in range(3)]
    for i, day in enumerate(days):
        publish_synthetic(lake, day, synthetic_features(day, 300 + 50 * i, seed=i, cards=40))
    frame, counts = read_frame(lake, days)
    assert counts == [300, 350, 400]
    expected = FeatureFrame.concat([read_features(lake, [d]) for d in days])
    for name in ("x", "card", "time_us", "txid", "terminal"):
        assert np.array_equal(getattr(frame, name), getattr(expected, name)), name
    assert not frame.label.any()
    # laid out by column, filled a column at a time, with the values of a row-major fill
    assert frame.x.strides[0] == frame.x.itemsize and expected.x.flags.c_contiguous
    with ThreadPoolExecutor(1) as helper:  # the days shared with a second thread: the same frame
        helper.submit(time.sleep, 0.2)  # busy at first, as with the label reads: it joins in late
        shared, shared_counts = read_frame(lake, days, helper=helper)
    assert shared_counts == counts
    for name in ("x", "card", "time_us", "txid", "terminal"):
        assert np.array_equal(getattr(shared, name), getattr(expected, name)), name
    path = posixpath.join(lake.partition_path(Dataset.FEATURES, days[1]), MANIFEST)
    manifest = lake.read_json(path)
    files = [{**f, "rows": f["rows"] - 1} if f["name"].endswith(".parquet") else f for f in manifest["files"]]
    lake.write_json(path, {**manifest, "files": files})
    with pytest.raises(ValueError, match=f"features of {days[1]}: the manifest names 349 rows, its files hold 350"):
        read_frame(lake, days)
    lake.write_json(path, {**manifest, "files": [{k: v for k, v in f.items() if k != "rows"} for f in files]})
    frame, counts = read_frame(lake, days)  # a manifest without row counts: the days are read first
    assert counts == [300, 350, 400] and np.array_equal(frame.txid, expected.txid)


def test_the_key_time_order_breaks_same_instant_ties_by_transaction_id():
    from jobs.torch.data import order_by_key_time

    rng = np.random.default_rng(3)
    n = 50_000
    key, time = rng.integers(0, 300, n), rng.integers(0, 400, n) * 1_000_000  # many same-instant ties
    txid = rng.permutation(n).astype(np.int64) + 10**9
    for step in (1_000_000, 1_000, 1):  # codes in seconds, milliseconds and microseconds
        shifted = time // 1_000_000 * step + 17
        by = order_by_key_time(key, shifted, txid)
        assert by.unit == step
        assert np.array_equal(by.order, np.lexsort((txid, shifted, key)))
        assert np.all(np.diff(by.code) >= 0) and np.array_equal(by.key, key[by.order])
        assert np.array_equal(by.time, shifted[by.order])
        # "the rows at or before t": the same as counting them, for times on and between the rows'
        queries = shifted[:2_000] + rng.integers(-2, 3, 2_000) * max(step // 2, 1)
        qkeys = key[:2_000]
        counts = np.array([np.count_nonzero((key < k) | ((key == k) & (shifted <= t))) for k, t in zip(qkeys, queries,
                                                                                                     strict=True)])
        assert np.array_equal(by.rows_at_or_before(qkeys, queries), counts)


@pytest.mark.parametrize("terminals,days", [(4_000, 20), (1_000_000, 60)], ids=["dense-ids", "sparse-ids"])
def test_history_lookups_agree_with_the_three_key_sort_used_when_codes_would_overflow(monkeypatch, terminals, days):
    """The one-key sort over the rows of the targets' keys and the three-key sort over every row give
    the same history. With sparse terminal ids over 60 days, at microsecond resolution, the
    (terminal, microsecond) code overflows unless the ids are first replaced by their rank among the
    ids present, which is then the path taken; with whole seconds the code counts seconds."""

    rng = np.random.default_rng(0)

    def frame(n: int, first_id: int, shift_days: int, first_terminal: int) -> FeatureFrame:
        seconds = rng.integers(0, days * 86_400, n)  # few instants: many same-instant ties
        micros = rng.integers(0, 2, n) if terminals > 100_000 else 0  # not whole seconds: a microsecond code
        return FeatureFrame(rng.random((n, len(MODEL_INPUTS)), dtype=np.float32) * 50,
                            (rng.random(n) < 0.1).astype(np.int8), rng.integers(0, 2_000, n),
                            (seconds + shift_days * 86_400) * 1_000_000 + micros, first_id + rng.permutation(n),
                            rng.integers(first_terminal, terminals, n))

    # target terminals below, among and above the pool's, many with no row in it
    pool, target = frame(20_000, 0, 0, 100), frame(3_000, 10**6, 10, 0)
    target.terminal[:50] = terminals + 7
    terminal_order = D.order_by_key_time(pool.terminal, pool.time_us, pool.txid)
    assert (terminal_order.slot_of is not None) == (terminals > 100_000) and terminal_order.code is not None
    assert terminal_order.unit == (1 if terminals > 100_000 else 1_000_000)
    fast = (D.build_history(target, pool, 5), D.build_terminal_history(target, TerminalRows.of_frame(pool), 5, 7, inline(pool)))
    # the same rows in a part per day, with a part wholly younger than every bound (dropped whole)
    by_day = np.argsort(pool.time_us // MICROS_PER_DAY, kind="stable")
    rows = TerminalRows.of_frame(pool).take(by_day)
    cuts = [0, *(np.flatnonzero(np.diff(rows.time_us // MICROS_PER_DAY)) + 1).tolist(), len(by_day)]
    bound = int(target.time_us.max()) - 7 * MICROS_PER_DAY
    younger = TerminalRows.of_frame(target).take(np.flatnonzero(target.time_us > bound))
    assert len(cuts) > 10 and len(younger.terminal)
    parts = [rows.take(np.arange(a, b)) for a, b in itertools.pairwise(cuts)] + [younger]
    assert np.array_equal(D.build_terminal_history(target, parts, 5, 7, inline(pool)), fast[1])

    def three_keys(key, time, txid):
        order = np.lexsort((txid, time, key))
        return D.KeyTimeOrder(order, key[order], time[order], None)

    monkeypatch.setattr(D, "order_by_key_time", three_keys)
    assert D.wanted_keys(target.terminal, pool.terminal) is not None  # the fast path sorted fewer rows
    assert D.history_rows_that_count(pool.card, pool.time_us, target.card, 5, 10) is not None
    monkeypatch.setattr(D, "wanted_keys", lambda wanted, *keys: None)  # every row, as before that
    monkeypatch.setattr(D, "history_rows_that_count", lambda *a: None)
    slow = (D.build_history(target, pool, 5), D.build_terminal_history(target, TerminalRows.of_frame(pool), 5, 7, inline(pool)))
    assert np.array_equal(fast[0].prev, slow[0].prev) and np.array_equal(fast[0].gap_days, slow[0].gap_days)
    assert np.array_equal(fast[1], slow[1])
    assert 0 < fast[1][..., 4].mean() < 1  # some rows have fewer than 5 matured terminal rows


def test_history_rows_older_than_a_cards_last_k_are_not_sorted_and_the_history_is_unchanged(monkeypatch):
    """With several transactions a card a day (as the generator makes), most of a week's history rows
    have k rows of their card on later days: they are left out of the sort, and every target row
    (on two target days) still links to the same previous rows as when all rows are sorted."""

    rng = np.random.default_rng(5)

    def frame(n: int, first_day: int, days: int, first_id: int) -> FeatureFrame:
        seconds = first_day * 86_400 + rng.integers(0, days * 86_400, n)
        return FeatureFrame(rng.random((n, len(MODEL_INPUTS)), dtype=np.float32), np.zeros(n, np.int8),
                            rng.integers(0, 300, n), seconds * 1_000_000, first_id + rng.permutation(n),
                            rng.integers(0, 50, n))

    history, target = frame(7 * 900, 17_000, 7, 0), frame(2 * 900, 17_007, 2, 10**6)
    pool = FeatureFrame.concat([history, target])
    kept = D.history_rows_that_count(history.card, history.time_us, target.card, 5, 17_007)
    assert kept is not None and len(kept) < 0.6 * len(history)
    # what is left out is exactly what has 5 rows of its card on later history days, or a card no target has
    later = np.array([np.count_nonzero((history.card == c) & (history.time_us // MICROS_PER_DAY > t // MICROS_PER_DAY))
                      for c, t in zip(history.card, history.time_us, strict=True)])
    assert np.array_equal(np.flatnonzero((later < 5) & np.isin(history.card, target.card)), kept)
    by_day = np.argsort(history.time_us // MICROS_PER_DAY, kind="stable")  # days in order, as read_frame lays them
    kept_by_day = D.history_rows_that_count(history.card[by_day], history.time_us[by_day], target.card, 5, 17_007)
    assert np.array_equal(np.sort(by_day[kept_by_day]), kept)
    fast = D.build_history(target, history, 5, pool=pool)
    monkeypatch.setattr(D, "history_rows_that_count", lambda *a: None)
    slow = D.build_history(target, history, 5, pool=pool)
    assert np.array_equal(fast.prev, slow.prev) and np.array_equal(fast.gap_days, slow.gap_days)
    assert np.array_equal(fast.pool_rows, slow.pool_rows) and np.array_equal(fast.pool, slow.pool)
    source = fast.pool_rows[fast.prev[fast.prev >= 0]]
    assert (source < len(history)).any() and (source >= len(history)).any()  # history and same-day rows


@pytest.mark.parametrize("step,keys", [(1_000_000, 50), (1_000, 50), (1, 50), (1, 2**40)],
                         ids=["seconds", "milliseconds", "microseconds", "codes-overflow"])
def test_rows_ordered_by_key_time_and_id_as_a_three_key_sort_orders_them(step, keys):
    """The packed-word order of a subset of rows (the compiled passes) equals a three-key sort of
    those rows at each time unit, same-instant ties ordered by id, and so does the fallback taken
    when the (key, time) code and the row number do not fit one word."""
    rng = np.random.default_rng(7)
    n = 30_000
    key = rng.integers(0, keys, n)
    time = 1_500_000_000_000_000 + rng.integers(0, 2_000, n) * step + (rng.integers(0, 10**9) if step == 1 else 0)
    txid = rng.permutation(n) + 10**6
    rows = np.sort(rng.choice(n, 20_000, replace=False))
    order, sorted_key, sorted_time = D.order_rows_by_key_time(rows, key, time, txid)
    expected = rows[np.lexsort((txid[rows], time[rows], key[rows]))]
    assert np.array_equal(order, expected)
    assert np.array_equal(sorted_key, key[expected]) and np.array_equal(sorted_time, time[expected])
    tied = (sorted_key[1:] == sorted_key[:-1]) & (sorted_time[1:] == sorted_time[:-1])
    assert tied.any() or keys > n  # same-instant ties were there to order


@pytest.mark.parametrize("queries", ["ascending", "random", "negative"])
def test_search_sorted_answers_as_numpy_for_queries_in_any_order(queries):
    """The galloping search over sorted queries (packed words, or an argsort where a query is
    negative) gives ``np.searchsorted``'s answer on both sides, duplicates and out-of-range values
    included."""
    rng = np.random.default_rng(3)
    a = np.sort(rng.integers(0, 50_000, 200_000))
    v = rng.integers(-10 if queries == "negative" else 0, 60_000, 30_000)
    if queries == "ascending":
        v.sort()
    for side in ("left", "right"):
        assert np.array_equal(D.search_sorted(a, v, side), np.searchsorted(a, v, side=side))


def test_the_history_loops_compiled_ahead_are_the_ones_a_lake_read_runs(lake):
    """``compile_history_loops`` (run by the image build) compiles every one of the history's loops
    for the array types that scoring and training from the lake pass them: reading a day's history
    and a training window's afterwards compiles nothing more."""
    from jobs.torch import kernels

    # the public loops (a private helper is compiled into its callers, not on its own)
    loops = {name: loop for name, loop in vars(kernels).items() if hasattr(loop, "signatures") and name[0] != "_"}
    assert len(loops) >= 8
    D.compile_history_loops()
    compiled = {name: list(loop.signatures) for name, loop in loops.items()}
    assert all(compiled.values()), compiled
    publish(lake, days=16, rows=300)
    cfg = ModelConfig(kind="seq", seq_len=5, lookback_days=7, terminal_len=5, terminal_lookback_days=14,
                      label_delay_days=7)
    frame, history = read_for_model(lake, [FIRST + timedelta(days=15)], cfg, CAL)
    assert (history.prev >= 0).any() and history.terminal[..., 4].any()
    days = [FIRST + timedelta(days=i) for i in range(9, 15)]
    read_for_model(lake, days, cfg, CAL, labels_as_of=days[-1] + timedelta(days=1))
    assert {name: list(loop.signatures) for name, loop in loops.items()} == compiled


def test_card_history_links_each_target_to_the_previous_rows_of_its_card_and_keeps_only_those():
    """Against a direct search: a target's previous rows are the last k rows of its card ordered by
    (time, transaction id) before it, history and target rows alike; the pool holds exactly the rows
    some target looks back at, as read."""
    rng = np.random.default_rng(11)

    def frame(n: int, first_day: int, days: int, first_id: int) -> FeatureFrame:
        seconds = first_day * 86_400 + rng.integers(0, days * 24, n) * 3_600  # same-instant ties
        return FeatureFrame(rng.random((n, len(MODEL_INPUTS)), dtype=np.float32), np.zeros(n, np.int8),
                            rng.integers(0, 300, n), seconds * 1_000_000, first_id + rng.permutation(n),
                            rng.integers(0, 50, n))

    history, target = frame(700, 17_000, 7, 0), frame(300, 17_007, 1, 10**6)  # some cards with fewer than k rows
    k = 3
    linked = D.build_history(target, history, k)
    pool = FeatureFrame.concat([history, target])
    assert np.array_equal(linked.pool, pool.x[linked.pool_rows])
    assert np.array_equal(np.unique(linked.prev[linked.prev >= 0]), np.arange(len(linked.pool)))
    assert (np.diff(linked.pool_rows) > 0).all()  # in the order read: the scorer's gathers walk forwards
    # the same pool gathered from rows laid out by column, whole or a few positions at a time
    by_column = FeatureFrame.empty(len(pool), by_column=True)
    for name in D._FRAME_FIELDS:
        getattr(by_column, name)[:] = getattr(pool, name)
    again = D.build_history(by_column.rows(len(history), len(pool)), by_column.rows(0, len(history)), k, pool=by_column)
    assert np.array_equal(again.prev, linked.prev) and np.array_equal(again.pool_rows, linked.pool_rows)
    some = np.array([3, 0, 3, len(linked.pool_rows) - 1])
    assert np.array_equal(again.pool_inputs(some), linked.pool[some]) and np.array_equal(again.pool, linked.pool)
    assert again.pool.flags.c_contiguous
    for i in range(len(target)):
        mine = (pool.time_us[len(history) + i], pool.txid[len(history) + i])
        before = sorted((j for j in np.flatnonzero(pool.card == target.card[i]) if (pool.time_us[j], pool.txid[j]) < mine),
                        key=lambda j: (pool.time_us[j], pool.txid[j]))[-k:]
        present = linked.prev[i] >= 0
        assert present.sum() == len(before) and not present[: k - len(before)].any()  # missing ones first
        assert list(linked.pool_rows[linked.prev[i][present]]) == before
        gaps = (target.time_us[i] - pool.time_us[before]) / MICROS_PER_DAY
        np.testing.assert_allclose(linked.gap_days[i][present], gaps, rtol=1e-6)
        assert not linked.gap_days[i][~present].any()


@pytest.mark.slow
def test_torchrun_with_two_processes_trains_with_ddp_and_only_rank_0_writes(lake):
    publish(lake, days=7, rows=200)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc_per_node=2", "-m", "jobs.torch.train", "--lake", lake.uri, "--date", T1.isoformat(), *FAST]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    registry = R.Registry(lake)
    assert registry.decision(T1)["outcome"] == R.PROMOTED
    assert len(registry.versions()) == 1
    assert json.loads(registry.read_file(registry.decision(T1)["champion"], R.LINEAGE))["world_size"] == 2


def test_byte_dropout_keeps_the_expected_share_unbiased_and_repeatably():
    from jobs.torch.model import ByteDropout

    drop = ByteDropout(0.2).train()
    x = torch.ones(1_000, 500)
    torch.manual_seed(0)
    a = drop(x)
    torch.manual_seed(0)
    assert torch.equal(a, drop(x))
    assert abs(float((a > 0).float().mean()) - 0.8) < 0.005
    assert abs(float(a.mean()) - 1.0) < 0.01
    assert torch.equal(drop.eval()(x), x)


def test_fused_relu_dropout_gives_the_values_and_gradients_of_relu_then_dropout():
    from jobs.torch.model import ByteDropout

    drop = ByteDropout(0.2).train()
    x = torch.randn(300, 70, requires_grad=True)
    upstream = torch.randn(300, 70)
    torch.manual_seed(3)
    separate = drop(torch.relu(x))
    (grad_separate,) = torch.autograd.grad(separate, x, upstream)
    torch.manual_seed(3)
    fused = drop.relu_then_drop(x)
    (grad_fused,) = torch.autograd.grad(fused, x, upstream)
    assert torch.equal(fused, separate)
    assert torch.equal(grad_fused, grad_separate)
    assert 0.3 < float((fused > 0).float().mean()) < 0.5  # ~half positive, ~80% of those kept


@pytest.mark.parametrize("input_grad", [False, True])
def test_the_fused_one_hidden_layer_mlp_trains_as_the_layer_by_layer_one(input_grad):
    """The MLP's fused training path (one hidden layer, CPU) gives the logits and every gradient of
    Linear -> ReLU -> ByteDropout -> Linear with the same random bytes (the sequence head needs the
    input's gradient too); eval mode is the plain module."""
    from jobs.torch.model import MLP

    torch.manual_seed(0)
    mlp = MLP(30, [64], 0.2).train()
    x = torch.randn(500, 30, requires_grad=input_grad)
    upstream = torch.randn(500)
    params = list(mlp.parameters()) + ([x] if input_grad else [])
    torch.manual_seed(4)
    fused = mlp(x)
    grads_fused = torch.autograd.grad(fused, params, upstream)
    net = list(mlp.net)
    torch.manual_seed(4)
    layered = net[3](net[2](net[1](net[0](x)))).squeeze(-1)
    grads_layered = torch.autograd.grad(layered, params, upstream)
    assert fused.grad_fn is not None and "OneHiddenLayer" in type(fused.grad_fn).__name__  # the fused path ran
    torch.testing.assert_close(fused, layered, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_fused, grads_layered, strict=True):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert "OneHiddenLayer" not in type(mlp.eval()(x).grad_fn).__name__  # eval: no dropout, the plain layers


def test_an_ensemble_is_stored_as_one_wider_mlp_with_the_mean_logit():
    from jobs.torch.model import ModelConfig, build_model

    torch.manual_seed(0)
    members = [build_model(ModelConfig(hidden=[8])).eval() for _ in range(3)]
    cfg = train.TrainConfig(lake="x", date="2018-04-15", model="mlp", hidden=[8], ensemble=3).resolved()
    assert cfg.model_config().hidden == [24] and cfg.member_config().hidden == [8]
    merged = merge_ensemble(members, cfg.model_config())
    z = torch.randn(50, 25)
    with torch.no_grad():
        expected = torch.stack([m(z) for m in members]).mean(dim=0)
        torch.testing.assert_close(merged(z), expected, rtol=1e-5, atol=1e-6)


def test_shared_work_runs_every_piece_once_on_either_thread_and_the_helper_returns_when_the_job_ends():
    """A job's pieces run once each, here or on the helping thread, results in order; a failing piece
    fails the job with its error; the helper returns once the job is over, whichever way it ended."""
    shared = D.SharedWork()
    ran: list[tuple[int, str]] = []
    started = threading.Event()

    def piece(i: int) -> int:
        ran.append((i, threading.current_thread().name))
        if i == 0:
            started.set()
            time.sleep(0.2)  # the helper takes the others meanwhile
        return i * i

    def job() -> list:
        return shared.run([lambda i=i: piece(i) for i in range(6)]) + shared.run([lambda: piece(6)])

    with ThreadPoolExecutor(1, thread_name_prefix="owner") as side:
        done = side.submit(job)
        started.wait(5)
        shared.help_until(done)
        assert done.result() == [0, 1, 4, 9, 16, 25, 36]
    assert sorted(i for i, _ in ran) == list(range(7))
    assert {name for _, name in ran} == {threading.current_thread().name, "owner_0"}  # both took pieces

    failing = D.SharedWork()

    def broken() -> None:
        raise ValueError("piece 2 failed")

    with ThreadPoolExecutor(1) as side:
        done = side.submit(failing.run, [lambda: None, lambda: time.sleep(0.1), broken, lambda: None])
        failing.help_until(done)
        with pytest.raises(ValueError, match="piece 2 failed"):
            done.result()
