"""Resuming a run is resuming the same experiment: a run whose data changed since its checkpoint (a list file
edited, images replaced: the config is the same, the files it names are not) is refused before it trains, with
one line naming the run directory and what to do; a damaged env.json (a record, not state) is set aside with a
warning, and the run goes on to its summary."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from test_federated_methods import CIFAR_JPEG

from conftest import ROOT
from fedlt.rundir import RunDir
from fedlt.simulate import main

DEFAULT = str(ROOT / "configs/default.yaml")
TINY = ["data.profile=none", "train.batch_size=32", "partition.num_clients=2", "partition.min_size=1"]
CENTRAL = ["mode=centralized", "centralized.epochs=2", "sweep={}", "name=run", *TINY]


def write_fashion(root, seed: int = 0) -> None:
    """A tiny Fashion-MNIST in IDX .gz files: 40 training and 10 test images of random pixels (drawn from
    ``seed``), labels 0..9 in turn."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", 40), ("t10k", 10)):
        for kind, array in (("images-idx3", rng.integers(0, 255, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def cli(capsys, out, *args: str) -> tuple[int, str, str]:
    """Run the command line in this process, as a new process would (no experiment built before): (exit status,
    stdout, stderr)."""
    from fedlt.experiment import _cached

    torch.set_num_threads(1)
    _cached.cache_clear()
    code = main(["--config", DEFAULT, "--out", str(out), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def interrupted(monkeypatch, capsys, out, *args: str) -> RunDir:
    """A run stopped after its first step (as by Ctrl-C): its checkpoint holds step 1."""
    import fedlt.run_loop

    with monkeypatch.context() as m:
        m.setattr(fedlt.run_loop, "stop_requested", lambda: True)
        code, _, err = cli(capsys, out, *args)
    assert code == 130, err
    (path,) = out.iterdir()  # the one run of the command
    run = RunDir(path)
    assert run.load_checkpoint()["step"] == 1 and not (run.path / "summary.json").exists()
    return run


def trained_steps(monkeypatch) -> list[int]:
    """The steps that centralized and federated runs train from now on, in order."""
    from fedlt.centralized.run import CentralizedSteps
    from fedlt.federation.server import FederatedSteps

    steps: list[int] = []
    for cls in (CentralizedSteps, FederatedSteps):
        def step(self, t, _step=cls.step):
            steps.append(t)
            return _step(self, t)

        monkeypatch.setattr(cls, "step", step)
    return steps


def write_list(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def jpeg_lists(tmp_path):
    """Train and test lists of CIFAR-10 JPEGs: 30 training images (3 a class), 20 test images; and 60 other
    training images to edit the train list with."""
    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    by_class: dict[int, list[str]] = {}
    for line in (CIFAR_JPEG / "train.txt").read_text().splitlines():
        if line.strip():
            by_class.setdefault(int(line.split()[-1]), []).append(line)
    test = [line for line in (CIFAR_JPEG / "test.txt").read_text().splitlines() if line.strip()][:20]
    train = [line for c in range(10) for line in by_class[c][:3]]
    other = [line for c in range(10) for line in by_class[c][3:9]]
    write_list(tmp_path / "train.txt", train)
    write_list(tmp_path / "test.txt", test)
    return tmp_path, train, other


def jpeg_args(lists) -> list[str]:
    return ["data.name=cifar10_files", f"data.root={CIFAR_JPEG}", f"data.train_list={lists / 'train.txt'}",
            f"data.test_list={lists / 'test.txt'}", "data.cache=false", "model.name=small_cnn", "train.batch_size=8"]


def assert_refused_before_training(capsys, out, run: RunDir, steps: list[int], args: list[str]) -> str:
    """The run resumed with other data: exit status 2, one line, no step trained, the run's files as they were."""
    before = {name: (run.path / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl", "partition.json")}
    code, _, err = cli(capsys, out, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert steps == []
    assert {name: (run.path / name).read_bytes() for name in before} == before
    assert not (run.path / "summary.json").exists()
    return err.strip()


def test_a_centralized_run_resumed_after_its_train_list_was_edited_is_refused(monkeypatch, capsys, jpeg_lists):
    """The bug: the list file replaced by one of other images, the same command resumed after epoch 1 and
    finished with partition.json of the old images and summary.json of the new ones."""
    lists, train, other = jpeg_lists
    out, args = lists / "runs", [*(a for a in CENTRAL if a != "train.batch_size=32"), *jpeg_args(lists)]
    run = interrupted(monkeypatch, capsys, out, *args)
    write_list(lists / "train.txt", other)
    steps = trained_steps(monkeypatch)
    line = assert_refused_before_training(capsys, out, run, steps, args)
    assert line == (f"error: run directory {run.path}: the data changed since its checkpoint after epoch 1 "
                    f"(training set: 30 images at the checkpoint, 60 now); restore the data the run started with "
                    f"and run the same command again to resume, or delete {run.path / 'checkpoint.pt'} to start "
                    f"the run over")

    write_list(lists / "train.txt", train)  # the data back: the run resumes and finishes
    code, stdout, err = cli(capsys, out, *args)
    assert code == 0, err
    assert "resuming after epoch 1" in stdout and steps == [2]
    summary = json.loads((run.path / "summary.json").read_text())
    partition = json.loads((run.path / "partition.json").read_text())
    assert summary["train_class_counts"] == partition["train_class_counts"] == [3] * 10
    assert summary["data_fingerprint"]["train"]["images"] == 30
    assert run.load_checkpoint()["data"] == summary["data_fingerprint"]


def test_a_federated_run_resumed_after_its_images_were_replaced_is_refused(monkeypatch, capsys, tmp_path):
    """Other pixels in the same number of images with the same labels: only a digest of the images tells."""
    write_fashion(tmp_path)
    out = tmp_path / "runs"
    args = ["mode=federated", "federation.rounds=2", "train.local_steps=1", "federation.engine=inprocess",
            "sweep={}", "name=run", f"data.root={tmp_path}", *TINY]
    run = interrupted(monkeypatch, capsys, out, *args)
    kept = {f: f.read_bytes() for f in tmp_path.glob("*.gz")}
    (tmp_path / "data").mkdir()
    write_fashion(tmp_path / "data", seed=1)
    for f in tmp_path.glob("train-images*.gz"):  # the training images of another draw, the labels as they were
        f.write_bytes((tmp_path / "data" / f.name).read_bytes())
    steps = trained_steps(monkeypatch)
    line = assert_refused_before_training(capsys, out, run, steps, args)
    assert line.startswith(f"error: run directory {run.path}: the data changed since its checkpoint after round 1 "
                           f"(training set: 40 images, other images or labels now); restore the data")

    for f, data in kept.items():
        f.write_bytes(data)
    code, stdout, err = cli(capsys, out, *args)
    assert code == 0, err
    assert "resuming after round 1" in stdout and steps == [2]


def test_a_checkpoint_of_an_earlier_fedlt_without_the_data_still_resumes(monkeypatch, capsys, tmp_path):
    write_fashion(tmp_path)
    out, args = tmp_path / "runs", [*CENTRAL, f"data.root={tmp_path}"]
    run = interrupted(monkeypatch, capsys, out, *args)
    older = run.load_checkpoint()
    del older["data"]
    run.save_checkpoint(older)
    code, stdout, err = cli(capsys, out, *args)
    assert code == 0, err
    assert "resuming after epoch 1" in stdout
    assert run.load_checkpoint()["data"] == json.loads((run.path / "summary.json").read_text())["data_fingerprint"]


@pytest.mark.parametrize("damage", [b'{"fedlt": "0.', b"[1]", b"\xff\xfe{}"], ids=["truncated", "list", "not-utf8"])
def test_a_damaged_env_json_is_set_aside_before_a_resumed_run_trains(monkeypatch, capsys, tmp_path, damage):
    """The bug: the resumed run trained every step, then failed on env.json (JSONDecodeError, no file named, no
    summary), on every retry. Now: a warning naming it before the first step, its bytes kept under a new name
    (never over an earlier one), env.json written again, and the run's summary."""
    write_fashion(tmp_path)
    out, args = tmp_path / "runs", [*CENTRAL, f"data.root={tmp_path}"]
    run = interrupted(monkeypatch, capsys, out, *args)
    (run.path / "env.json.damaged").write_bytes(b"set aside by an earlier resume")
    (run.path / "env.json").write_bytes(damage)
    code, stdout, err = cli(capsys, out, *args)
    assert code == 0, err
    warning = f"warning: {run.path / 'env.json'} is damaged ("
    assert warning in stdout and stdout.index(warning) < stdout.index("epoch 2/2")
    assert "set aside as env.json.damaged.2 and written again with the environment of this process" in stdout
    assert (run.path / "env.json.damaged.2").read_bytes() == damage
    assert (run.path / "env.json.damaged").read_bytes() == b"set aside by an earlier resume"
    env = json.loads((run.path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["peak_memory_mib"] > 0
    assert "env.json.damaged.2" in env["note"]
    assert RunDir(run.path).done


def test_env_json_damaged_during_the_run_does_not_lose_its_summary(tmp_path, capsys):
    """update_env at the end of a run: a damaged env.json is set aside there too, never a traceback."""
    run = RunDir(tmp_path)
    (tmp_path / "env.json").write_text("{not json")
    run.update_env({"peak_memory_mib": 12.5})
    assert (tmp_path / "env.json.damaged").read_text() == "{not json"
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["peak_memory_mib"] == 12.5 and "env.json.damaged" in env["note"]
    assert f"warning: {tmp_path / 'env.json'} is damaged (not JSON: " in capsys.readouterr().out
    run.update_env({})  # env.json fine again: nothing more set aside
    (tmp_path / "env.json").write_text("[]")
    run.update_env({})
    assert (tmp_path / "env.json.damaged.2").read_text() == "[]"  # an earlier one is never overwritten
    run.clear()  # --overwrite: the earlier run's records go, the set-aside ones with them
    assert not list(tmp_path.glob("env.json*"))
