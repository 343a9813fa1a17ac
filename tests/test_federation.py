"""Federated runs on a small Fashion-MNIST-LT through Flower's simulation engine (Ray: a basic run, a resumed
run, a failing client) and through the in-process engine (bit-identical to Ray, tested; everything else), and
the strategy's aggregation on hand-made replies."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.federation.inprocess import run_inprocess
from fedlt.federation.runner import run_federated
from fedlt.federation.strategy import ClientFailure, FedLTStrategy, sample_cohort

SMALL = ["mode=federated", "partition.num_clients=4", "federation.rounds=3", "federation.fraction=0.75",
         "train.local_steps=25", "train.batch_size=32", "model.name=small_cnn", "data.imbalance_factor=100"]
RUN_FILES = ("config.yaml", "env.json", "partition.json", "metrics.jsonl", "summary.json", "checkpoint.pt")


def small_cfg(*extra):
    return load_config(None, SMALL + list(extra))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed") / "run"
    return path, run_federated(small_cfg(), str(path))


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    """The first run's config, evaluated every 2nd round, through the in-process engine."""
    path = tmp_path_factory.mktemp("fed") / "again"
    return path, run_inprocess(small_cfg("eval.every=2"), str(path))


@needs_fashion
@pytest.mark.slow
def test_fedavg_run_beats_chance_and_writes_every_file(first_run):
    path, summary = first_run
    for name in RUN_FILES:
        assert (path / name).is_file(), name
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # round 0: the initial model
    for key in ("loss", "accuracy", "balanced_accuracy", "many", "medium", "few"):
        assert key in rows[0]
    assert summary["accuracy"] > 0.2  # chance is 0.1 on the balanced test set
    for key in ("accuracy", "balanced_accuracy", "many", "medium", "few", "per_class", "ece", "group_rule",
                "wall_clock_seconds"):
        assert key in json.loads((path / "summary.json").read_text())
    part = json.loads((path / "partition.json").read_text())
    assert np.sum(part["client_class_counts"]) == 14886 and len(part["client_class_counts"]) == 4
    assert [r["clients"] for r in rows[1:]] == [sample_cohort(0, t, 4, 0.75) for t in (1, 2, 3)]
    assert all(r["train_images"] > 0 for r in rows[1:]) and summary["train_images"] == sum(r["train_images"]
                                                                                          for r in rows[1:])


@needs_fashion
@pytest.mark.slow
def test_same_seed_gives_identical_numbers_whatever_the_eval_schedule(first_run, inprocess_run):
    _, a = first_run
    path, b = inprocess_run
    for key in ("accuracy", "balanced_accuracy", "many", "medium", "few", "ece", "per_class"):
        assert a[key] == b[key], key
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert ["accuracy" in r for r in rows] == [True, False, True, True]  # round 0, every 2nd round and the last
    assert rows[-1]["accuracy"] == b["accuracy"] and all(r["train_loss"] > 0 for r in rows[1:])


@needs_fashion
@pytest.mark.slow
def test_inprocess_engine_is_bit_identical_to_flower_simulation(first_run, inprocess_run):
    (ray_path, ray), (path, inproc) = first_run, inprocess_run
    assert set(ray) == set(inproc) and ray["config_digest"] != inproc["config_digest"]
    # config_digest: the two configs differ (engine, eval_every), so do their digests
    for key in set(ray) - {"wall_clock_seconds", "seconds_per_round", "train_seconds", "images_per_second",
                           "peak_memory_mib", "config_digest"}:
        assert ray[key] == inproc[key], key
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (ray_path, path))
    assert a["step"] == b["step"] == 3 and a["state"]["strategy"] == b["state"]["strategy"]
    wa, wb = a["state"]["model"], b["state"]["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a, rows_b = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (ray_path, path))
    assert [(r.get("clients"), r.get("train_loss")) for r in rows_a] == [(r.get("clients"), r.get("train_loss"))
                                                                        for r in rows_b]
    # the in-process run evaluates every 2nd round (and the last): where both evaluated, the same numbers
    assert [ra["accuracy"] for ra, rb in zip(rows_a, rows_b) if "accuracy" in rb] == \
        [rb["accuracy"] for rb in rows_b if "accuracy" in rb]
    assert (ray_path / "partition.json").read_text() == (path / "partition.json").read_text()


@needs_fashion
@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(first_run, tmp_path):
    _, reference = first_run
    flag = tmp_path / "flag"
    flag.write_text("")
    cfg = small_cfg("plugins=[plugins_for_tests]", "strategy.name=interrupt_once", "strategy.stop_round=3",
                    f"strategy.flag={flag}", "client.name=fedavg", "eval.every=3")
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match="interrupted before round 3"):
        run_federated(cfg, str(path))
    assert not (path / "summary.json").exists()
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 3  # rounds 0, 1, 2
    resumed = run_federated(cfg, str(path))
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 4
    for key in ("accuracy", "per_class", "ece"):
        assert resumed[key] == reference[key], key


@needs_fashion
@pytest.mark.parametrize("engine", [pytest.param(run_federated, marks=pytest.mark.slow), run_inprocess])
def test_a_failing_client_fails_the_run_with_its_traceback(tmp_path, engine):
    cfg = small_cfg("plugins=[plugins_for_tests]", "client.name=failing_client", "federation.fraction=1.0",
                    "federation.rounds=1")
    with pytest.raises(ClientFailure) as failure:
        engine(cfg, str(tmp_path / "run"))
    message = str(failure.value)
    # the partition id (not Flower's node id), the error, the bound, then the client's traceback once, no wrapper
    assert message.splitlines()[0] == ("client of partition 1 failed in round 1: ValueError: deliberate failure "
                                       "on partition 1 (failure 1, federation.max_failures=0)")
    # the client's traceback once (Ray's error wrapping drops its "Traceback (most recent call last)" header line)
    assert message.count('raise ValueError("deliberate') == 1 and message.count("Traceback (most recent call") <= 1
    assert message.rstrip().endswith("ValueError: deliberate failure on partition 1")
    for noise in ("ClientAppException", "ray::", "RayTaskError", "fedlt-client-error", "node"):
        assert noise not in message, noise
    assert not (tmp_path / "run" / "summary.json").exists()


@needs_fashion
def test_a_failure_within_max_failures_is_tolerated_and_counted(tmp_path, capsys):
    cfg = small_cfg("plugins=[plugins_for_tests]", "client.name=failing_client", "federation.fraction=1.0",
                    "federation.rounds=1", "federation.max_failures=1")
    summary = run_inprocess(cfg, str(tmp_path / "run"))
    assert ("warning: client of partition 1 failed in round 1: ValueError: deliberate failure on partition 1 "
            "(failure 1/1 tolerated)") in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["strategy"]["failures"] == 1
    assert summary["rounds"] == 1 and 0 <= summary["accuracy"] <= 1
    assert summary["failures"] == {"total": 1, "per_round": [1], "setup": 0}
    initial, row = (json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert initial["round"] == 0 and "clients" not in initial  # the initial model: nothing trained
    assert row["clients"] == [0, 2, 3]  # only the aggregated updates
    assert row["failed"] == [{"partition": 1, "error": "ValueError: deliberate failure on partition 1"}]


@needs_fashion
def test_injected_failures_follow_their_stream_and_are_recorded(tmp_path):
    from fedlt.federation.apps import injected_failure
    from fedlt.streams import Stream, seeded_rng

    cfg = small_cfg("federation.failure_rate=0.4", "federation.max_failures=100", "eval.every=3")
    expected = [[p for p in sample_cohort(0, t, 4, 0.75) if seeded_rng(0, Stream.FAILURE, t, p).random() < 0.4]
                for t in (1, 2, 3)]
    assert [[p for p in sample_cohort(0, t, 4, 0.75) if injected_failure(cfg, t, p)] for t in (1, 2, 3)] == expected
    assert 0 < sum(map(len, expected)) < 9  # this seed fails some clients, not all
    summary = run_inprocess(cfg, str(tmp_path / "run"))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows.pop(0)["round"] == 0  # the initial model
    for t, (row, failed) in enumerate(zip(rows, expected), 1):
        assert [f["partition"] for f in row["failed"]] == failed
        assert row["clients"] == [p for p in sample_cohort(0, t, 4, 0.75) if p not in failed]
        assert all(f["error"].endswith(f"injected failure of partition {f['partition']} in round {t} "
                                       f"(federation.failure_rate=0.4)") for f in row["failed"])
    assert summary["failures"] == {"total": sum(map(len, expected)), "per_round": list(map(len, expected)),
                                   "setup": 0}


def test_the_failure_stream_is_reproducible_and_at_its_rate():
    from fedlt.federation.apps import injected_failure

    cfg = small_cfg("federation.failure_rate=0.3")
    draws = [injected_failure(cfg, t, p) for t in range(1, 101) for p in range(20)]
    assert draws == [injected_failure(cfg, t, p) for t in range(1, 101) for p in range(20)]
    assert abs(np.mean(draws) - 0.3) < 0.03
    assert draws != [injected_failure(small_cfg("federation.failure_rate=0.3", "seed=1"), t, p)
                     for t in range(1, 101) for p in range(20)]
    assert not any(injected_failure(small_cfg(), t, p) for t in range(1, 101) for p in range(20))


@needs_fashion
def test_a_round_where_every_client_failed_ends_with_one_line(tmp_path):
    cfg = small_cfg("federation.failure_rate=0.99", "federation.max_failures=100")
    with pytest.raises(ClientFailure) as failure:
        run_inprocess(cfg, str(tmp_path / "run"))
    message = str(failure.value)
    assert message == (f"round 1: every client failed (partitions {', '.join(map(str, sample_cohort(0, 1, 4, 0.75)))}; "
                       f"first error: fedlt.federation.apps.InjectedFailure: injected failure of partition "
                       f"{sample_cohort(0, 1, 4, 0.75)[0]} in round 1 (federation.failure_rate=0.99)), nothing to "
                       f"aggregate (3 failures so far, federation.max_failures=100)")
    assert not (tmp_path / "run" / "summary.json").exists()


def error_reply(request: Message, reason: str) -> Message:
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode

    request.metadata.__dict__["_message_id"] = "m"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=request)


def test_error_replies_name_the_partition_without_the_engines_wrapping(message_identity):
    from fedlt.federation.apps import ERROR_BEGIN, ERROR_END

    strategy = FedLTStrategy(small_cfg("federation.max_failures=5"), 10)
    strategy.bind({0: 1001, 1: 1002, 2: 1003})
    strategy.begin_round(2)
    block = f"{ERROR_BEGIN}2\nKeyError: 'x'\nTraceback (most recent call last):\n  File \"c.py\"\nKeyError: 'x'\n{ERROR_END}"
    ray = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run() (pid=7, ip=1.2.3.4)\n"
           f"  File \"ray_actor.py\", line 65\nException ClientAppException occurred. Message: {block}\n"
           f"The above exception was the direct cause\n{block}'>")
    died = "<class 'ray.exceptions.RayActorError'>:<'The actor died unexpectedly before finishing this task.'>"
    replies = [reply(0, 10, 1.0), error_reply(Message(RecordDict(), dst_node_id=1003, message_type="train"), ray),
               error_reply(Message(RecordDict(), dst_node_id=1002, message_type="train"), died)]
    arrays, _ = strategy.aggregate_train(2, strategy.check_replies(replies))
    record = strategy.round_record
    assert record.aggregated == [[0]] and np.allclose(arrays["w"].numpy(), 1.0)
    assert [(f.partition, f.error) for f in record.failed] == [
        (2, "KeyError: 'x'"),
        (1, "RayActorError: The actor died unexpectedly before finishing this task.")]
    assert record.failed[0].traceback == "Traceback (most recent call last):\n  File \"c.py\"\nKeyError: 'x'"
    assert strategy.failures == 2 and strategy.failure_summary() == {"total": 2, "per_round": [0, 2, 0], "setup": 0}
    with pytest.raises(ClientFailure, match="^round 2: every client failed \\(partitions 1; first error: "
                                            "RayActorError: The actor died"):
        strategy.check_replies([error_reply(Message(RecordDict(), dst_node_id=1002, message_type="train"), died)])


def test_the_round_loops_grid_checks_each_reply_once_before_any_hook(message_identity):
    """Every hook (run_round, aggregate_train, aggregate_checked, a query) gets its replies from the round
    loop's CheckedGrid: the failed ones already dropped and counted, once even where a query checks again,
    and a client's weights that do not fit the model stop the run with one line."""
    from fedlt.federation.server import CheckedGrid

    strategy = FedLTStrategy(small_cfg("federation.max_failures=5"), 10)
    strategy.bind({0: 1001, 1: 1002})
    strategy.begin_round(1)
    died = "<class 'ray.exceptions.RayActorError'>:<'The actor died unexpectedly before finishing this task.'>"

    class Engine:  # partition 1 fails; partition 0 trains for 2 seconds
        def send_and_receive(self, messages, *, timeout=None):
            good = reply(0, 10, 1.0)
            good.content["metrics"]["fit_seconds"] = 2.0
            return [error_reply(Message(RecordDict(), dst_node_id=1002, message_type="train"), died), good]

        def get_node_ids(self):
            return [1001, 1002]

    grid = CheckedGrid(Engine(), strategy, {"w": (2, 2)}, "fedavg")
    assert grid.get_node_ids() == [1001, 1002]
    replies = strategy.query(grid, [0, 1], ArrayRecord({"w": torch.zeros(2, 2)}), "any", server_round=1)
    assert [int(m.content["metrics"]["partition-id"]) for m in replies] == [0]
    assert strategy.failures == 1 and len(strategy.round_record.failed) == 1 and strategy.fit_seconds == 2.0
    assert strategy.check_replies(replies) is replies and strategy.failures == 1
    with pytest.raises(FedLTError, match=r"^partition 0, round 1: the weights client method fedavg sent hold key "
                                         r"'w' in shape \[2, 2\], the global model's is \[4\]$"):
        CheckedGrid(Engine(), strategy, {"w": (4,)}, "fedavg").send_and_receive([])


def reply(pid: int, n: int, value: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.full((2, 2), value)}),
                          "metrics": MetricRecord({"num-examples": n, "partition-id": pid, "train_loss": value})})
    msg = Message(content=content, dst_node_id=0, message_type="train")
    return msg


def test_fedavg_aggregate_is_the_weighted_mean(message_identity):
    cfg = small_cfg()
    strategy = FedLTStrategy(cfg, 10)
    replies = [reply(2, 30, 4.0), reply(0, 10, 1.0), reply(1, 60, -2.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (10 * 1.0 + 60 * -2.0 + 30 * 4.0) / 100
    assert np.allclose(arrays["w"].numpy(), expected)
    assert metrics["train_loss"] == pytest.approx(expected)


def test_fedavg_aggregate_keeps_dtypes_and_rounds_integer_buffers(message_identity):
    """Weights 59, 59, 7 of a num_batches_tracked of 50: Flower's float mean is 49.999…, which a cast truncates
    to 49; the aggregate keeps every array's dtype, the integer buffer rounded."""
    strategy = FedLTStrategy(small_cfg(), 10)

    def bn_reply(pid: int, n: int) -> Message:
        msg = reply(pid, n, 1.0)
        msg.content["arrays"] = ArrayRecord({"w": torch.full((2, 2), 1.0), "num_batches_tracked": torch.tensor(50)})
        return msg

    arrays, _ = strategy.aggregate_train(1, [bn_reply(0, 59), bn_reply(1, 59), bn_reply(2, 7)])
    state = arrays.to_torch_state_dict()
    assert state["num_batches_tracked"].dtype == torch.int64 and state["num_batches_tracked"].item() == 50
    assert state["w"].dtype == torch.float32 and torch.allclose(state["w"], torch.ones(2, 2))


def test_cohorts_are_seeded_distinct_and_sized():
    a = sample_cohort(0, 5, 100, 0.2)
    assert a == sample_cohort(0, 5, 100, 0.2) and len(a) == 20 and len(set(a)) == 20
    assert a != sample_cohort(0, 6, 100, 0.2) and a != sample_cohort(1, 5, 100, 0.2)
    assert sample_cohort(0, 1, 3, 0.01) and len(sample_cohort(0, 1, 3, 1.0)) == 3


@needs_fashion
def test_a_run_stopped_after_its_last_checkpoint_finishes_from_it(inprocess_run, tmp_path):
    import shutil

    path, reference = inprocess_run
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    for name in ("summary.json", "done"):  # as if stopped between the last checkpoint and the summary
        (copy / name).unlink(missing_ok=True)
    again = run_inprocess(small_cfg("eval.every=2"), str(copy))
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 4  # rounds 0-3: no round ran again
    for key in ("accuracy", "per_class", "ece", "reliability"):
        assert again[key] == reference[key], key
