"""Scoring: champion as of the day, waiting and no-champion exits, scores and alerts partitions."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs.common.cli import EXIT_NO_CHAMPION, EXIT_WAITING
from jobs.common.lake import Dataset, Lake
from jobs.common.schema import ALERTS_SCHEMA, SCORES_SCHEMA
from jobs.torch import registry as R
from jobs.torch import score, train
from jobs.torch.checkpoint import IncompatibleModel, Loaded, load_version
from jobs.torch.model import ModelConfig
from jobs.torch.predict import predict_columns
from jobs.torch.synthetic import publish_synthetic, synthetic_features

FIRST = date(2018, 4, 1)
T1, T2 = date(2018, 4, 15), date(2018, 4, 22)
FAST = ["--epochs", "2", "--hidden", "16"]


@pytest.fixture(scope="module")
def trained_lake(tmp_path_factory):
    """Features for 2018-04-01..04-23 and decisions for 04-15 and 04-22 (trained once per module)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"FRAUD_FIRST_DATE": "2018-04-01", "FRAUD_TRAIN_EVERY_DAYS": "7",
                            "FRAUD_TRAIN_WINDOW_DAYS": "7", "FRAUD_ALERT_K": "100"}.items():
            mp.setenv(name, value)
        lake = Lake.from_uri((tmp_path_factory.mktemp("scored") / "lake").as_uri())
        for i in range(23):
            day = FIRST + timedelta(days=i)
            publish_synthetic(lake, day, synthetic_features(day, 300, cards=150))
        assert score.main(["--lake", lake.uri, "--date", "2018-04-14"]) == EXIT_NO_CHAMPION
        assert score.main(["--lake", lake.uri, "--date", T1.isoformat()]) == EXIT_WAITING
        for day in (T1, T2):
            assert train.main(["--lake", lake.uri, "--date", day.isoformat(), *FAST]) == 0
        yield lake


@pytest.fixture(autouse=True)
def schedule_env(monkeypatch):
    monkeypatch.setenv("FRAUD_FIRST_DATE", "2018-04-01")
    monkeypatch.setenv("FRAUD_TRAIN_WINDOW_DAYS", "7")
    monkeypatch.setenv("FRAUD_TRAIN_EVERY_DAYS", "7")


def test_no_champion_publishes_nothing_and_records_why(trained_lake):
    lake = trained_lake
    assert not lake.is_published(Dataset.SCORES, date(2018, 4, 14))
    assert not lake.is_published(Dataset.ALERTS, date(2018, 4, 14))
    records = lake.list_files(lake.path("_runs", "score", "date=2018-04-14"))
    assert records and lake.read_json(records[0].path)["status"] == "skipped"


def test_scores_every_row_with_the_champion_as_of_the_day(trained_lake):
    lake = trained_lake
    registry = R.Registry(lake)
    assert score.main(["--lake", lake.uri, "--start", "2018-04-20", "--end", "2018-04-22", "--k", "20"]) == 0
    for day in (date(2018, 4, 20), date(2018, 4, 21), T2):
        expected = registry.champion_as_of(day)["version"]
        scores = lake.read_table(Dataset.SCORES, day)
        assert scores.schema.equals(SCORES_SCHEMA)
        features = lake.read_table(Dataset.FEATURES, day)
        assert scores.num_rows == features.num_rows
        assert sorted(scores.column("TRANSACTION_ID").to_pylist()) == sorted(features.column("TRANSACTION_ID").to_pylist())
        assert set(scores.column("model_version").to_pylist()) == {expected}
    # the day before the T2 decision is scored with the T1 champion, T2 with its own
    v20 = lake.read_table(Dataset.SCORES, date(2018, 4, 21)).column("model_version")[0].as_py()
    v22 = lake.read_table(Dataset.SCORES, T2).column("model_version")[0].as_py()
    assert v20 == registry.decision(T1)["champion"] and v22 == registry.decision(T2)["champion"] != v20


def test_alerts_are_the_top_k_cards_by_max_score(trained_lake):
    lake = trained_lake
    day = date(2018, 4, 20)
    assert score.main(["--lake", lake.uri, "--date", day.isoformat(), "--k", "25"]) == 0
    scores = lake.read_table(Dataset.SCORES, day).to_pandas()
    alerts = lake.read_table(Dataset.ALERTS, day)
    assert alerts.schema.equals(ALERTS_SCHEMA) and alerts.num_rows == 25
    per_card = scores.groupby("CUSTOMER_ID")["score"].agg(["max", "size"]).reset_index()
    per_card = per_card.sort_values(["max", "CUSTOMER_ID"], ascending=[False, True]).head(25)
    a = alerts.to_pandas()
    assert a["CUSTOMER_ID"].tolist() == per_card["CUSTOMER_ID"].tolist()
    np.testing.assert_array_equal(a["score"].to_numpy(), per_card["max"].to_numpy())
    assert a["n_tx"].tolist() == per_card["size"].tolist()
    assert a["rank"].tolist() == list(range(1, 26))
    # one write publishes the pair: the alerts' manifest names the very scores attempt readers get
    embedded = lake._own_manifest(Dataset.ALERTS, day)["companions"][Dataset.SCORES]
    assert embedded["attempt"] == lake.manifest(Dataset.SCORES, day)["attempt"]


@pytest.mark.parametrize("killed_at", [Dataset.SCORES, Dataset.ALERTS])
def test_scoring_killed_at_either_manifest_leaves_scores_and_alerts_of_one_run(trained_lake, monkeypatch, killed_at):
    lake = trained_lake
    day = date(2018, 4, 20)
    assert score.main(["--lake", lake.uri, "--date", day.isoformat(), "--k", "5"]) == 0
    real_write_json = type(lake).write_json

    def killed(self, path, obj):
        if f"{killed_at}/" in path and path.endswith("_MANIFEST.json"):
            raise OSError("killed")
        return real_write_json(self, path, obj)

    monkeypatch.setattr(type(lake), "write_json", killed)
    with pytest.raises(OSError):
        score.score_day(lake, R.Registry(lake), day, k=7, cache={})
    monkeypatch.setattr(type(lake), "write_json", real_write_json)
    k_of_scores = lake.manifest(Dataset.SCORES, day)["lineage"]["parameters"]["k"]
    assert lake.read_table(Dataset.ALERTS, day).num_rows == k_of_scores  # alerts and scores of one run
    assert lake.read_table(Dataset.SCORES, day).num_rows > 0


def test_alert_ranks_break_ties_by_card():
    table = pa.table({"TRANSACTION_ID": [1, 2, 3, 4], "CUSTOMER_ID": [9, 3, 3, 5],
                      "TX_DATETIME": pa.array([0, 0, 0, 0], pa.timestamp("us")),
                      "score": [0.5, 0.5, 0.1, 0.7], "model_version": ["v"] * 4}, schema=SCORES_SCHEMA)
    alerts = score.alerts_table(table, k=3).to_pylist()
    assert [(a["CUSTOMER_ID"], a["n_tx"], a["rank"]) for a in alerts] == [(5, 1, 1), (3, 2, 2), (9, 1, 3)]


def test_rescoring_a_day_gives_the_same_partition_content(trained_lake):
    lake = trained_lake
    day = date(2018, 4, 21)
    assert score.main(["--lake", lake.uri, "--date", day.isoformat()]) == 0
    first = lake.read_table(Dataset.SCORES, day)
    assert score.main(["--lake", lake.uri, "--date", day.isoformat()]) == 0
    assert lake.read_table(Dataset.SCORES, day).equals(first)


def test_waiting_for_a_decision_is_not_no_champion(trained_lake):
    # 2018-04-29 is a training day without a decision: scoring it must wait, not use the newest model
    lake = trained_lake
    for i in range(23, 29):
        day = FIRST + timedelta(days=i)
        publish_synthetic(lake, day, synthetic_features(day, 50, cards=150))
    rc = score.main(["--lake", lake.uri, "--date", "2018-04-29"])
    assert rc == EXIT_WAITING and rc not in (0, EXIT_NO_CHAMPION)
    assert not lake.is_published(Dataset.SCORES, date(2018, 4, 29))


def test_a_model_for_other_features_is_refused(trained_lake):
    registry = R.Registry(trained_lake)
    version = registry.decision(T1)["champion"]
    ckpt = torch.load(io.BytesIO(registry.read_file(version, R.CHECKPOINT)), weights_only=True)
    for key, value in (("features", ckpt["features"][::-1]), ("feature_schema_version", "0" * 16)):
        buf = io.BytesIO()
        torch.save({**ckpt, key: value}, buf)
        with pytest.raises(IncompatibleModel):
            load_version(buf.getvalue(), "bad")


def test_fast_alerts_match_a_full_group_by():
    rng = np.random.default_rng(0)
    n = 20_000
    card = rng.integers(0, 3_000, n)
    score_values = np.round(rng.random(n), 3)  # many ties, across and within cards
    table = pa.table({"TRANSACTION_ID": np.arange(n), "CUSTOMER_ID": card,
                      "TX_DATETIME": pa.array(np.zeros(n, np.int64), pa.timestamp("us")),
                      "score": score_values, "model_version": ["v"] * n}, schema=SCORES_SCHEMA)
    for k in (1, 100, 2_500):
        cards = table.group_by("CUSTOMER_ID").aggregate([("score", "max"), ("score", "count")])
        cards = cards.sort_by([("score_max", "descending"), ("CUSTOMER_ID", "ascending")]).slice(0, k)
        got = score.alerts_table(table, k)
        assert got.column("CUSTOMER_ID").to_pylist() == cards.column("CUSTOMER_ID").to_pylist()
        assert got.column("score").to_pylist() == cards.column("score_max").to_pylist()
        assert got.column("n_tx").to_pylist() == cards.column("score_count").to_pylist()


def test_folded_chunked_scoring_matches_the_scorer_module():
    from jobs.torch.model import InputTransform, build_model, scorer_for

    torch.manual_seed(0)
    cfg = ModelConfig(hidden=[64, 32])
    x = torch.rand(5_000, len(score.MODEL_INPUTS)) * 50
    scorer = scorer_for(cfg, InputTransform.fit(x), build_model(ModelConfig(hidden=[64, 32]))).eval()
    loaded = Loaded("v", cfg, scorer)
    with torch.no_grad():
        expected = scorer(x).double().numpy()
    cols = [x[:, j].double().numpy() for j in range(x.shape[1])]
    for workers in (1, 2):
        got = predict_columns(loaded, cols, workers=workers, chunk=700)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.array_equal(predict_columns(loaded, cols, workers=2, chunk=700),
                          predict_columns(loaded, cols, workers=1, chunk=700))  # scheduling-independent


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_the_accelerator_path_scores_as_the_cpu_path(tmp_path, kind):
    """``predict_on`` (the GPU scorer) runs the same module in large batches; on the CPU here, in
    batches that split the frame unevenly, it gives ``predict``'s scores within float32 rounding."""
    from jobs.common.calendar import Calendar
    from jobs.torch.data import read_for_model
    from jobs.torch.model import InputTransform, build_model, scorer_for
    from jobs.torch.predict import predict, predict_on

    lake = Lake.from_uri(tmp_path.as_uri())
    days = [FIRST + timedelta(days=i) for i in range(16)]
    for day in days:
        publish_synthetic(lake, day, synthetic_features(day, 400, cards=60))
    cfg = ModelConfig(kind=kind, hidden=[32], lookback_days=7, terminal_len=3 if kind == "seq" else 0,
                      terminal_lookback_days=14, label_delay_days=7)
    frame, history = read_for_model(lake, days[-2:], cfg, Calendar(FIRST))
    torch.manual_seed(1)
    loaded = Loaded("v", cfg, scorer_for(cfg, InputTransform.fit(torch.from_numpy(frame.x)), build_model(cfg)).eval())
    expected = predict(loaded, frame, history)
    got = predict_on("cpu", loaded, frame, history, batch_size=333)
    assert got.shape == (800,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert np.unique(got.round(4)).size > 100  # a model that scores, not a constant
    assert next(loaded.scorer.parameters()).device.type == "cpu"  # the loaded model is not moved
    if kind == "seq":
        with pytest.raises(ValueError, match="needs the card history"):
            predict_on("cpu", loaded, frame, None)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_attributions_add_up_to_the_logit_above_the_average_transaction(tmp_path, kind):
    """Integrated gradients are complete: per explained row, the attributions sum to the logit at
    the row minus the logit at the baseline (the training means), and the logit is the scorer's."""
    from jobs.common.calendar import Calendar
    from jobs.common.schema import MODEL_INPUTS
    from jobs.torch.data import read_for_model
    from jobs.torch.explain import attribution_lists, integrated_gradients
    from jobs.torch.model import InputTransform, build_model, scorer_for
    from jobs.torch.predict import predict

    lake = Lake.from_uri(tmp_path.as_uri())
    days = [FIRST + timedelta(days=i) for i in range(12)]
    for day in days:
        publish_synthetic(lake, day, synthetic_features(day, 200, cards=40))
    cfg = ModelConfig(kind=kind, hidden=[32], lookback_days=7, terminal_len=3 if kind == "seq" else 0,
                      terminal_lookback_days=10, label_delay_days=7)
    frame, history = read_for_model(lake, days[-1:], cfg, Calendar(FIRST))
    torch.manual_seed(2)
    loaded = Loaded("v", cfg, scorer_for(cfg, InputTransform.fit(torch.from_numpy(frame.x)), build_model(cfg)).eval())
    rows = np.array([0, 7, 50, 199])
    # a few hundred rows run single-threaded (intra-op threads' barriers cost ten times the work
    # beside the scores' write), and the process's thread count is given back afterwards
    seen, before = [], torch.get_num_threads()
    hook = loaded.scorer.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    torch.set_num_threads(2)
    try:
        attr, logit, base = integrated_gradients(loaded, frame.x[rows], history, rows)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert attr.shape == (4, len(MODEL_INPUTS))
    np.testing.assert_allclose(1 / (1 + np.exp(-logit)), predict(loaded, frame, history)[rows], rtol=1e-5)
    gap = logit - base
    assert np.abs(gap).max() > 1e-3  # the rows differ from the average transaction
    np.testing.assert_allclose(attr.sum(axis=1), gap, rtol=0.05, atol=0.01)
    lists = attribution_lists(frame.x[rows], attr)
    magnitudes = [abs(e["attribution"]) for e in lists[1]]
    assert magnitudes == sorted(magnitudes, reverse=True) and len(lists[1]) == len(MODEL_INPUTS)
    assert lists[2][0]["value"] == pytest.approx(float(frame.x[50, MODEL_INPUTS.index(lists[2][0]["input"])]))


def test_each_alert_names_its_top_transaction_and_why(trained_lake):
    lake = trained_lake
    day = date(2018, 4, 21)
    assert score.main(["--lake", lake.uri, "--date", day.isoformat(), "--k", "10"]) == 0
    scores = lake.read_table(Dataset.SCORES, day).to_pandas().set_index("TRANSACTION_ID")
    alerts = lake.read_table(Dataset.ALERTS, day).to_pylist()
    assert len(alerts) == 10 and "integrated gradients" in lake.manifest(Dataset.ALERTS, day)["stats"]["attributions"]
    for alert in alerts:
        top = scores.loc[alert["top_transaction_id"]]
        assert top["CUSTOMER_ID"] == alert["CUSTOMER_ID"] and top["score"] == alert["score"]
        names = [e["input"] for e in alert["attributions"]]
        assert sorted(names) == sorted(score.MODEL_INPUTS)
        effects = [abs(e["attribution"]) for e in alert["attributions"]]
        assert effects == sorted(effects, reverse=True) and effects[0] > 0


def test_versions_trained_before_drift_references_get_one_from_their_window(trained_lake, capsys):
    """Training stores a version's drift reference; for a version without one (trained before
    references were kept) ``registry reference`` computes the same from its training window."""
    import json

    lake = trained_lake
    registry = R.Registry(lake)
    version = registry.decision(T1)["champion"]
    stored = registry.reference(version)
    assert stored["rows"] == json.loads(registry.read_file(version, R.METRICS))["train"]["rows"]
    assert set(stored["inputs"]) == set(score.MODEL_INPUTS) and len(stored["score"]["shares"]) == 10
    path = registry.version_path(version, R.REFERENCE)
    lake.fs.delete_file(path)  # as a version trained before references were kept
    assert registry.reference(version) is None
    assert R.main(["--lake", lake.uri, "reference"]) == 0
    assert f"{version}: drift reference stored" in capsys.readouterr().out
    again = registry.reference(version)
    assert again["rows"] == stored["rows"] and again["inputs"].keys() == stored["inputs"].keys()
    np.testing.assert_allclose(again["score"]["cuts"], stored["score"]["cuts"], rtol=1e-6)
    assert R.main(["--lake", lake.uri, "reference", version]) == 0
    assert "already there" in capsys.readouterr().out


@pytest.mark.parametrize("setting", [None, "1"], ids=["default", "operator"])
def test_a_torch_step_process_runs_without_numpys_huge_page_advice_unless_the_environment_asks(setting):
    """The CLI's process imports jobs.torch before numpy, so the default holds from numpy's first
    import; an operator's own NUMPY_MADVISE_HUGEPAGE wins."""
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = setting
    code = "import jobs.torch.score, numpy; print(numpy._core.multiarray._get_madvise_hugepage())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("True" if setting == "1" else "False")


_REFAULTS = """
import resource, sys, numpy as np
import jobs.torch.{module}, jobs.torch
np.ones(1 << 24)  # 128 MiB, touched, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(1 << 24)
print(jobs.torch.KEPT_FREED_MEMORY, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("module,tunables", [("score", None), ("train", None), ("score", "glibc.malloc.check=0"),
                                             ("registry", None)], ids=["score", "train", "operator", "registry-only"])
def test_a_torch_step_process_reuses_freed_memory_without_new_page_faults_unless_the_environment_tunes_malloc(
        module, tunables):
    """A second 128 MiB array in the scoring or training step's process lands on the pages the first
    one had: no fault for each of its 32,768 pages, as when glibc maps and unmaps every large block.
    An operator's own glibc.malloc tunables leave the allocator as they set it, and so does a process
    that only reads the registry (a sensor, the report page: long-lived ones hand memory back)."""
    if not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""):
        pytest.skip("glibc's allocator only")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", _REFAULTS.format(module=module)], env=env, capture_output=True,
                         text=True, check=True)
    kept, faults = out.stdout.split()
    if tunables is None and module != "registry":
        assert kept == "True" and int(faults) < 2_000
    else:
        assert kept == ("False" if tunables else "None") and int(faults) > 30_000
