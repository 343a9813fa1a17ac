"""The one prepared GPU check of issue 11, for a session that is lent a device (15 minutes of device time in all).

Here, on the CPU machine (once; both folders are git-ignored):

    .venv/bin/python benchmarks/device_check.py prepare

writes ``.device-data/cifar10-lt`` (CIFAR-10-LT β = 100 from the JPEG copy in ../shared/data/cifar10-jpeg: the
first n_c = ⌊5000·0.01^(c/9)⌋ images of class c in list order, 12,406 in all, plus the 10,000 test images,
≈21 MB) and ``.whl`` (the wheels fedlt needs beyond the device image's own packages, for its Python 3.12:
Flower without Ray, pydantic, and what they import), then prints the device command and its ``carry``.

There, the printed command installs them and runs ``run``: each step a subprocess with its own time limit,
inside ``--budget`` seconds, its output in ``$OUT/device_check.log`` and its numbers in
``$OUT/device_check.json``:

1. the fused engine's batch assembly, client by client against the whole group at once, 10 and 50 clients
   (``benchmarks/group_batch.py``; seconds, first so that the longer steps cannot use up its budget), then
   the host's side of a round on that machine's CPU (step 7, seconds);
2. the engines on ResNet-32, batch 64, 10 and 50 clients per round (``benchmarks/engine.py``: in-process, one
   client after another — the device image has no Ray, so the Flower engine is not run there — and fused);
3. GBME's protocol shape (100 clients, 20 per round, 2 local epochs, ResNet-32 experts, evaluation every 10
   rounds) for 20 rounds on the fused engine, projected to its 2,000 rounds — on CIFAR-10-LT images, as no
   CIFAR-100 copy is available offline (the same 32 × 32 compute; 10 classes instead of 100);
4. FedLoGe's protocol (40 clients, 30 % per round, 5 local epochs, batch 8, ResNet-18) for 3 rounds on the
   fused engine, projected to its 500 rounds;
5. JPEG decoding into the image cache on the CPU (one thread per core, and one thread as the baseline) and on
   the GPU (nvJPEG, ``data.decode_device=cuda``): 2,317 generated 375 × 500 JPEGs resized to 224 px
   (``benchmarks/imagenet_lt_scale.py --scale 0.02 --jpeg-size 375x500``, written under /tmp, not $OUT);
6. the fused step's loss, each client's objective on its own slice against the group's in one call, with
   operator counts, host-device synchronisations and milliseconds a step (``benchmarks/group_loss.py``:
   fedavg, fedprox, fedlc, gbme, local_loss, fedloge, fedrod, ncl, shike, tlc, area at 10 and 50 clients);
7. (run second) the host's side of a round on that machine's CPU: a client's weights decoded, its reply
   encoded, the server's mean, Flower's conversions against fedlt's (``benchmarks/boundary.py``).

Measured and projected figures are written apart (``projected_*`` keys). ``--device cpu --smoke`` runs every
step at toy sizes on this machine (the check of the script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".device-data" / "cifar10-lt"
WHEELS = ROOT / ".whl"
SOURCE = ROOT.parent / "shared" / "data" / "cifar10-jpeg"
# imported by fedlt on the in-process and fused engines, and missing from the device image (KINDS.md's list)
NEEDED = ["flwr", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "iterators",
          "pycryptodome", "cryptography", "cffi", "pycparser", "grpcio-health-checking"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def lt_counts(n_max: int = 5000, beta: float = 100.0, classes: int = 10) -> list[int]:
    """CIFAR-LT's exponential profile n_c = ⌊n_max · β^(−c/(C−1))⌋ (12,406 images for CIFAR-10, β = 100)."""
    return [int(n_max * beta ** (-c / (classes - 1))) for c in range(classes)]


def prepare_data() -> None:
    if not (SOURCE / "train.txt").is_file():
        sys.exit(f"error: no CIFAR-10 JPEG copy at {SOURCE}")
    keep, lines = lt_counts(), []
    for line in (SOURCE / "train.txt").read_text().splitlines():
        path, label = line.split()
        if keep[int(label)] > 0:
            keep[int(label)] -= 1
            lines.append(line)
    tests = (SOURCE / "test.txt").read_text().splitlines()
    if DATA.exists():
        shutil.rmtree(DATA)
    for line in lines + tests:
        src, dst = SOURCE / line.split()[0], DATA / line.split()[0]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    (DATA / "train.txt").write_text("\n".join(lines) + "\n")
    (DATA / "test.txt").write_text("\n".join(tests) + "\n")
    print(f"{DATA}: {len(lines)} train + {len(tests)} test images, {size_mib(DATA):.1f} MiB")


def prepare_wheels() -> None:
    from importlib.metadata import version

    if WHEELS.exists():
        shutil.rmtree(WHEELS)
    pins = [f"{name}=={version(name)}" for name in NEEDED]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(WHEELS), *pins],
                   check=True)
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels ({', '.join(pins)}), {size_mib(WHEELS):.1f} MiB")


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


DEVICE_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
                  "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && python3 -m pip install "
                  "-q --no-index --no-deps --no-build-isolation -e . && python3 benchmarks/device_check.py run "
                  "--out $OUT --budget 480")


# ------------------------------------------------------------------------------------------ on the device

def steps(device: str, smoke: bool) -> list[tuple[str, list[str], float]]:
    """(name, command, time limit in seconds) of each step."""
    py, data = sys.executable, [f"data.root={DATA}", "data.profile=none"]
    engine = [py, str(ROOT / "benchmarks" / "engine.py"), "--model", "resnet32", "--batch", "64", "--device", device,
              "--data", "cifar10_files", "--engines", "inprocess,fused"]
    gbme, fedloge = (["--config", f"configs/federated/{c}.yaml", "--out", "{out}/runs", "--overwrite",
                      "mode=federated", "federation.engine=fused", f"device={device}", "data.name=cifar10_files", *data]
                     for c in ("gbme_cifar100_lt", "fedloge_cifar10_lt"))
    fedloge.append("federation.fraction=0.3")  # issue 11 states FedLoGe's goal at 30 % (the config: its logs' 20 %)
    sim = [py, "-m", "fedlt.simulate"]
    decode = [py, str(ROOT / "benchmarks" / "imagenet_lt_scale.py"), "--work", "/tmp/fedlt-decode", "--decode-only",
              "--rounds", "0", "--jpeg-size", "375x500"]
    group = [py, str(ROOT / "benchmarks" / "group_batch.py"), "--device", device]
    loss = [py, str(ROOT / "benchmarks" / "group_loss.py"), "--device", device]
    boundary = [py, str(ROOT / "benchmarks" / "boundary.py")]
    if smoke:  # toy sizes: the script itself, on a CPU
        return [("group_batch", group + ["--clients", "2,4", "--steps", "3", "--repeats", "1"], 120),
                ("boundary", boundary + ["--repeats", "1", "--clients", "2"], 120),
                ("engine_10", engine + ["--clients-per-round", "2", "--rounds", "2", "--local-steps", "1", *data], 300),
                ("gbme_protocol", sim + gbme + ["federation.rounds=2", "partition.num_clients=10",
                                                "train.local_epochs=null", "train.local_steps=1", "eval.every=2",
                                                "strategy.prior=oracle"], 600),
                ("fedloge_protocol", sim + fedloge + ["federation.rounds=1", "train.local_epochs=null",
                                                      "train.local_steps=1", "client.sse_steps=10",
                                                      "model.name=resnet8"], 300),
                ("jpeg_decode", decode + ["--scale", "0.001", "--decode-devices", "cpu"], 300),
                ("group_loss", loss + ["--clients", "2", "--batch", "4", "--steps", "1", "--repeats", "1"], 300)]
    return [("group_batch", group, 60),  # first: a few seconds, and the other steps may use up the budget
            ("boundary", boundary + ["--repeats", "3"], 40),  # the host's side of a round: seconds
            ("engine_10", engine + ["--clients-per-round", "10", "--rounds", "3", *data], 150),
            ("engine_50", engine + ["--clients-per-round", "50", "--rounds", "3", *data], 150),
            ("gbme_protocol", sim + gbme + ["federation.rounds=20", "eval.every=10"], 150),
            ("fedloge_protocol", sim + fedloge + ["federation.rounds=3", "eval.every=3"], 150),
            ("jpeg_decode", decode + ["--scale", "0.02", "--workers", "16", "--decode-devices", "cpu,cuda"], 90),
            ("group_loss", loss + ["--steps", "5"], 90)]  # last: the goals' steps come first


def round_seconds(out: Path) -> list[dict]:
    """Each federated round's row (round ≥ 1) of the one run directory under ``out``."""
    rows = []
    for f in sorted(out.glob("*/metrics.jsonl")):
        rows += [r for r in map(json.loads, f.read_text().splitlines()) if r.get("round", 0) >= 1]
    return rows


def project(name: str, rows: list[dict], result: dict) -> None:
    """Projected wall time of the whole protocol: the measured rounds' training time scaled to all rounds (GBME:
    its joint and expert phases apart), the measured evaluations scaled to the protocol's, and once the rest of
    the measured run (start-up, data, GBME's prior-estimation epoch over every client)."""
    if not rows:
        return
    train = [r["train_seconds"] for r in rows]
    total = {"gbme_protocol": 2000, "fedloge_protocol": 500}[name]
    result["measured_round_seconds"] = [round(s, 2) for s in train]
    result["measured_eval_seconds"] = [round(r["seconds"] - r["train_seconds"], 2) for r in rows
                                       if r.get("accuracy") is not None]
    fixed = result["wall_seconds"] - sum(r["seconds"] for r in rows)
    result["measured_fixed_seconds"] = round(fixed, 1)
    later = train[1:] or train
    if name == "gbme_protocol":  # joint phase for t < 0.6T, then the expert phase (sub-rounds per expert)
        t = len(train)
        joint = [s for i, s in enumerate(train, 1) if i < 0.6 * t][1:] or later
        expert = [s for i, s in enumerate(train, 1) if i >= 0.6 * t] or later
        seconds = 0.6 * total * sum(joint) / len(joint) + 0.4 * total * sum(expert) / len(expert)
    else:
        seconds = total * sum(later) / len(later)
    evals = result["measured_eval_seconds"]
    if evals:  # evaluation every 10 rounds (GBME) / every round's last (FedLoGe's final only)
        seconds += (total / 10 if name == "gbme_protocol" else 1) * sum(evals) / len(evals)
    result["projected_total_minutes"] = round((seconds + fixed) / 60, 2)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "device_check.log", "a")  # noqa: SIM115 - the subprocesses write to it
    results: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "steps": {}}

    def save() -> None:
        (out / "device_check.json").write_text(json.dumps(results, indent=1))

    import torch

    results["torch"] = torch.__version__
    results["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    save()
    t_end = time.time() + args.budget
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    for name, cmd, limit in steps(args.device, args.smoke):
        if args.steps and name not in args.steps.split(","):
            continue
        left = t_end - time.time()
        if left < 20:
            results["steps"][name] = {"skipped": "no time left in --budget"}
            continue
        cmd = [c.replace("{out}", str(out / name)) for c in cmd]
        print(f"== {name}: {' '.join(cmd)}", file=log, flush=True)
        print(f"== {name} (limit {min(limit, left):.0f} s)", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=min(limit, left))
            text, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            text, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), "timeout"
        log.write(text)
        log.flush()
        result: dict = {"rc": rc, "wall_seconds": round(time.time() - t0, 1)}
        result["lines"] = [ln for ln in text.splitlines() if not ln.startswith("image cache:") and
                           ("img/s" in ln or "ratio" in ln or "ops/step" in ln or ln.startswith("decode on")
                            or "fused /" in ln or "ms per client" in ln
                            or "error" in ln.lower())]
        if name.endswith("_protocol"):
            project(name, round_seconds(out / name / "runs"), result)
        results["steps"][name] = result
        print(json.dumps(result), flush=True)
        save()
    log.close()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="here: write .device-data/cifar10-lt and .whl, print the device command")
    r = sub.add_parser("run", help="on the device: the steps, into --out")
    r.add_argument("--out", required=True)
    r.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together")
    r.add_argument("--device", default="cuda")
    r.add_argument("--smoke", action="store_true", help="toy sizes (a CPU check of this script)")
    r.add_argument("--steps", default="", help="comma-separated step names to run (default: all)")
    args = ap.parse_args()
    if args.command == "prepare":
        prepare_data()
        prepare_wheels()
        total = size_mib(DATA) + size_mib(WHEELS)
        print(f"carry [\".device-data\", \".whl\"]: {total:.1f} MiB (+ the working tree; 64 MiB in all)")
        print(f"device command:\n{DEVICE_COMMAND}")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
