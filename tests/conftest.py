import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# Plug-in modules written for the tests live in tests/plugins; Flower's client actors import them too.
sys.path.insert(0, str(ROOT / "tests"))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))

# The image cache of file-list data sets (fedlt.data.image_cache) goes to a folder of this session, not ~/.cache;
# subprocesses and Ray actors inherit it.
if not os.environ.get("FEDLT_CACHE_DIR"):
    import tempfile

    os.environ["FEDLT_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedlt-test-cache-")

needs_fashion = pytest.mark.skipif(not FASHION.is_dir() and not os.environ.get("CI"),
                                   reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture
def message_identity(monkeypatch):
    """Flower's Message() reads the process's task identity, which only a running app sets: give it one
    so that tests can build messages by hand in any order."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, getattr(TaskIdentity, attr) or 0)


def resumed_after_cut(run_centralized, cfg, run, cut: int, monkeypatch) -> tuple[dict, list[int]]:
    """Run ``run_centralized(cfg, run)``, kill it (KeyboardInterrupt) right after the checkpoint of step ``cut``,
    then run it again from that checkpoint: the resumed run's summary and the steps checkpointed before the cut."""
    from fedlt.rundir import RunDir

    orig, steps = RunDir.save_checkpoint, []

    def save(self, state):
        orig(self, state)
        steps.append(state["step"])
        if state["step"] == cut:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    with pytest.raises(KeyboardInterrupt):
        run_centralized(cfg, run)
    monkeypatch.setattr(RunDir, "save_checkpoint", orig)
    return run_centralized(cfg, run), steps
