"""Faults a cluster user meets, each reproduced as a probe would: changed settings on resume, two runs in one
directory, a killed sweep job, a diverging run, SIGTERM/SIGINT, damaged checkpoints and data, a full disk."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, compose_config, fast_overrides, read_predictions
from pcamx import pipeline
from pcamx.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from pcamx.data.pcam import PCamDataError, PCamSplit
from pcamx.data.synthetic import write_synthetic
from pcamx.runtime import disk, run_files
from pcamx.runtime.interrupts import RunInterrupted
from pcamx.runtime.locks import RunDirBusy
from pcamx.training import loop as train
from pcamx.training.loop import ModelCollapsed, TrainingDiverged
from pcamx.training.resume import ResumeMismatchError

TINY_MODEL = {"name": "dinov3_tiny"}


class Killed(BaseException):
    """Stands in for SIGKILL: nothing downstream catches it."""


def overrides(root: Path, *extra: str) -> list[str]:
    return fast_overrides(root, "train.epochs=2", "train.checkpoint_every=3", *extra)


def kill_at(monkeypatch: pytest.MonkeyPatch, at: int, action) -> None:
    original = train.warmup_cosine

    def hook(step: int, *args) -> float:
        if step == at:
            action()
        return original(step, *args)

    monkeypatch.setattr(train, "warmup_cosine", hook)


def killed_run(small_pcam: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    def die():
        raise Killed

    kill_at(monkeypatch, 5, die)
    with pytest.raises(Killed):
        pipeline.run(compose_config(*overrides(small_pcam, *extra)), run_dir=run_dir)
    monkeypatch.undo()
    assert (run_dir / run_files.RESUME).is_file()


# ---------------------------------------------------------------- nothing runs from a received file


class RunsCode:
    """What a hostile resume.pt holds: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_resume_pt_that_would_run_code_is_refused_by_name_and_never_run(small_pcam: Path, tmp_path: Path) -> None:
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    run_dir.mkdir()
    torch.save({"step": 3, "rng": RunsCode(marker)}, run_dir / run_files.RESUME)
    with pytest.raises(CheckpointError) as err:
        pipeline.run(compose_config(*overrides(small_pcam)), run_dir=run_dir)  # resume=auto reads it
    assert not marker.exists()
    message = str(err.value)
    assert message.startswith(f"{run_dir / run_files.RESUME} holds Python objects other than tensors")
    assert "resume=false" in message and "weights_only=False" not in message  # what to do, not torch's retry hint


# ---------------------------------------------------------------- honest resume


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_resume_refuses_changed_training_settings_names_them_and_leaves_the_run_dir_as_it_was(
        small_pcam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- train.lr=0.001\n")  # what Hydra writes for a job
    kill_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(RunInterrupted):
        pipeline.run(compose_config(*overrides(small_pcam)), run_dir=run_dir)
    monkeypatch.undo()
    before = snapshot(run_dir)
    assert json.loads(before["metrics.json"])["status"] == "interrupted"
    for mode in ("resume=auto", "resume=true"):
        # Hydra rewrites .hydra/ for the new command before pcamx runs: the refusal puts the old files back.
        (run_dir / ".hydra" / "overrides.yaml").write_text("- train.lr=0.05\n")
        with pytest.raises(ResumeMismatchError) as err:
            pipeline.run(compose_config(*overrides(small_pcam, "train.lr=0.05", mode)), run_dir=run_dir)
        message = str(err.value)
        assert "train.lr: 0.001 in resume.pt → 0.05 now" in message
        assert "resume=false" in message and "hydra.run.dir" in message
        assert "seed" not in message  # only what differs
        assert snapshot(run_dir) == before  # metrics.json, resolved_config.yaml, .hydra/, resume.pt, checkpoints
    fresh = pipeline.run(compose_config(*overrides(small_pcam, "train.lr=0.05", "resume=false")), run_dir=run_dir)
    assert fresh["status"] == "ok" and fresh["train_steps"] == 8


def test_resume_accepts_settings_that_do_not_change_training_and_logs_it(
        small_pcam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = tmp_path / "run"
    killed_run(small_pcam, run_dir, monkeypatch)
    saved_seconds = read_checkpoint(run_dir / run_files.RESUME)["seconds"]
    assert saved_seconds > 0
    caplog.set_level(logging.INFO, logger="pcamx")
    # Test-time evaluation, the data's location and the thread count change nothing about training.
    resumed = pipeline.run(compose_config(*overrides(small_pcam, "eval.tta=false", "hardware.num_threads=1",
                                                     "train.save_last=false")), run_dir=run_dir)
    assert "resumed from step 4 of 8 (epoch 2 of 2)" in caplog.text  # saved at the end of epoch 1
    assert resumed["train_seconds"] >= round(saved_seconds, 2)  # the time before the kill counts too


def test_a_kill_during_evaluation_resumes_after_the_last_step_and_counts_the_earlier_time(
        small_pcam: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def die(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(pipeline, "evaluate_stage", die)
    with pytest.raises(Killed):
        pipeline.run(compose_config(*overrides(small_pcam)), run_dir=tmp_path)
    monkeypatch.undo()
    saved = read_checkpoint(tmp_path / run_files.RESUME)
    assert saved["step"] == 8
    caplog.set_level(logging.INFO, logger="pcamx")
    resumed = pipeline.run(compose_config(*overrides(small_pcam)), run_dir=tmp_path)
    assert "resumed after its last step (8): training is done, evaluation follows" in caplog.text
    assert "epoch 3 of 2" not in caplog.text
    assert resumed["train_seconds"] >= round(saved["seconds"], 2)
    assert resumed["total_seconds"] >= resumed["train_seconds"]


# ---------------------------------------------------------------- run directory ownership


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process owning `run_dir`, as a second run would."""
    code = ("import sys, time; from pathlib import Path; from pcamx.runtime.locks import claim_run_dir; "
            "claim_run_dir(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_in_a_busy_directory_fails_at_once_and_touches_nothing(small_pcam: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"status": "ok", "owner": "the first run"}')
    holder = hold_lock(run_dir)
    try:
        started = time.time()
        with pytest.raises(RunDirBusy) as err:
            pipeline.run(compose_config(*overrides(small_pcam)), run_dir=run_dir)
        assert time.time() - started < 5
        assert f"PID {holder.pid}" in str(err.value) and "hydra.run.dir" in str(err.value)
        assert json.loads((run_dir / "metrics.json").read_text())["owner"] == "the first run"
        assert not (run_dir / "resolved_config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing (SIGKILL): its lock is stale and is taken over.
    assert (run_dir / run_files.LOCK).is_file()
    metrics = pipeline.run(compose_config(*overrides(small_pcam)), run_dir=run_dir)
    assert metrics["status"] == "ok" and not (run_dir / run_files.LOCK).exists()


def test_default_run_directories_differ_within_a_second() -> None:
    from omegaconf import OmegaConf

    cfg = compose_config(hydra_config=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert len(run_dir.rsplit("-", 1)[-1]) == 6  # microseconds after HH-MM-SS


@pytest.mark.slow
def test_concurrent_runs_generate_synthetic_data_once(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    code = ("import sys; from pcamx.data import synthetic; real = synthetic.write_synthetic\n"
            "def counting(*a, **k):\n    print('generated', flush=True); return real(*a, **k)\n"
            "synthetic.write_synthetic = counting\n"
            "synthetic.ensure_synthetic(sys.argv[1], {'train': 2048, 'valid': 64, 'test': 64}, 0)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(root)], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("generated") for out in outputs) == 1
    assert len(PCamSplit.load(root, "train")) == 2048


# ---------------------------------------------------------------- divergence


def test_a_collapsed_model_is_stopped_as_diverged_not_reported_ok(small_pcam: Path, tmp_path: Path) -> None:
    # The probe: a learning rate so high that every validation patch gets the same probability.
    cfg = compose_config(*fast_overrides(small_pcam, "method=fullft", "train.lr=1e4", "train.grad_clip=0",
                                         "train.warmup_steps=0"))
    with pytest.raises(ModelCollapsed, match=r"collapsed: validation after step \d+ predicted P\(tumour\) = \S+ "
                                             r"for every one of its 128 patches"):
        pipeline.run(cfg, run_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["reason"] == "collapsed"
    assert not (tmp_path / "best.pt").exists()  # the collapsed weights were never a candidate


def test_divergence_stops_at_the_step_and_saves_nothing_non_finite(small_pcam: Path, tmp_path: Path) -> None:
    cfg = compose_config(*overrides(small_pcam, "method=fullft", "train.lr=1e6", "train.grad_clip=0",
                                    "train.checkpoint_every=1", "train.val_every=0.25", "train.warmup_steps=1"))
    with pytest.raises(TrainingDiverged) as err:
        pipeline.run(cfg, run_dir=tmp_path)
    assert re.search(r"diverged.* step \d+", str(err.value)), str(err.value)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["reason"] == "diverged"
    for name in ("best.pt", "last.pt", run_files.RESUME):
        if (tmp_path / name).is_file():
            state = read_checkpoint(tmp_path / name)
            weights = state["model"]
            assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()), name


def test_divergence_message_names_step_learning_rates_and_last_finite_loss() -> None:
    watch = train.FiniteWatch("train")
    watch.push(0, torch.tensor(0.69), torch.tensor(1.5), [1e-3, 1e-4])
    watch.push(1, torch.tensor(0.52), torch.tensor(2.0), [1e-3, 1e-4])
    watch.push(2, torch.tensor(float("nan")), torch.tensor(3.0), [2e-3, 2e-4])
    with pytest.raises(TrainingDiverged) as err:
        watch.flush()
    assert str(err.value).startswith("train diverged at step 2: loss nan, gradient norm 3.0, learning rates 0.002, "
                                     "0.0002; the last finite loss was 0.52 at step 1.")


# ---------------------------------------------------------------- interrupts


def test_sigterm_mid_training_saves_and_the_rerun_ends_identically(small_pcam: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    reference = pipeline.run(compose_config(*overrides(small_pcam)), run_dir=tmp_path / "uninterrupted")
    kill_at(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGTERM))  # arrives mid-step 5
    with pytest.raises(RunInterrupted) as err:
        pipeline.run(compose_config(*overrides(small_pcam)), run_dir=tmp_path / "run")
    monkeypatch.undo()
    assert err.value.step == 6 and err.value.exit_code == 143  # step 5 finished, then it stopped
    stopped = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGTERM" and stopped["step"] == 6
    assert read_checkpoint(tmp_path / "run" / run_files.RESUME)["step"] == 6
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back
    resumed = pipeline.run(compose_config(*overrides(small_pcam)), run_dir=tmp_path / "run")
    for key in ("auroc", "nll", "brier", "ece", "acc", "sens_at_95spec"):
        assert resumed[key] == reference[key], key
    np.testing.assert_array_equal(read_predictions(tmp_path / "run" / "predictions.csv")[1],
                                  read_predictions(tmp_path / "uninterrupted" / "predictions.csv")[1])


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signalled_run_prints_one_line_and_exits_128_plus_signal(small_pcam: Path, tmp_path: Path, sig: int,
                                                                   code: int) -> None:
    run_dir = tmp_path / "run"
    command = [sys.executable, "run.py", *overrides(small_pcam, "train.epochs=500", "data.limit_val=32"),
               f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    deadline = time.time() + 120
    while time.time() < deadline and "train: 2000 steps" not in _read(run_dir / "run.log"):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-2000:]
    assert "Traceback" not in stderr
    line = [ln for ln in stderr.splitlines() if ln.startswith("pcamx: stopped by")]
    assert len(line) == 1 and signal.Signals(sig).name in line[0] and "rerun the same command" in line[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and (run_dir / run_files.RESUME).is_file()


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


# ---------------------------------------------------------------- verified checkpoints


@pytest.fixture(scope="module")
def trained(small_pcam: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "trained"
    pipeline.run(compose_config(*overrides(small_pcam, "prune=mlp", "prune.tau=0.9")), run_dir=run_dir)
    return run_dir


def flip_tensor_byte(path: Path) -> None:
    """Flip one byte inside the largest tensor record of a torch zip file (its CRC is not checked on load)."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (int.from_bytes(data[info.header_offset + o: info.header_offset + o + 2], "little")
                           for o in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_training_checkpoint_is_refused_with_its_path(trained: Path, tmp_path: Path) -> None:
    copy = tmp_path / "best.pt"
    copy.write_bytes((trained / "best.pt").read_bytes())
    load_checkpoint(copy, TINY_MODEL)  # intact: loads
    flip_tensor_byte(copy)
    torch.load(copy, weights_only=True)  # torch itself does not notice ...
    with pytest.raises(CheckpointError, match=f"{copy} is damaged"):  # ... pcamx does
        load_checkpoint(copy, TINY_MODEL)


def test_damaged_compressed_checkpoints_name_the_file(trained: Path, tmp_path: Path) -> None:
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    for name in ("model.safetensors", "architecture.json"):
        (compressed / name).write_bytes((trained / "compressed" / name).read_bytes())
    load_checkpoint(compressed, TINY_MODEL)
    weights = compressed / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # inside the last tensor's bytes: safetensors loads it without complaint
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is damaged"):
        load_checkpoint(compressed, TINY_MODEL)
    (compressed / "architecture.json").write_text('{"format": 1, "backbone_')
    with pytest.raises(CheckpointError, match="architecture.json could not be read"):
        load_checkpoint(compressed, TINY_MODEL)


def test_resume_pt_as_checkpoint_and_a_damaged_resume_pt_are_clear(small_pcam: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = tmp_path / "run"
    killed_run(small_pcam, run_dir, monkeypatch)
    with pytest.raises(CheckpointError, match="resumable state of an unfinished training run") as err:
        load_checkpoint(run_dir / run_files.RESUME, TINY_MODEL)
    assert "\x1b[" not in str(err.value)
    flip_tensor_byte(run_dir / run_files.RESUME)
    with pytest.raises(CheckpointError, match=f"{run_dir / run_files.RESUME} is damaged"):
        pipeline.run(compose_config(*overrides(small_pcam)), run_dir=run_dir)


# ---------------------------------------------------------------- damaged data


def damage_h5(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 4096, 64):
        data[offset] ^= 0xFF  # inside gzip-compressed chunks: the read's filter fails
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_damaged_hdf5_file_is_named_before_training(tmp_path: Path, in_memory: bool) -> None:
    root = write_synthetic(tmp_path / "data", {"train": 256, "valid": 64, "test": 256}, seed=0)
    damaged = root / "camelyonpatch_level_2_split_test_x.h5"
    damage_h5(damaged)
    cfg = compose_config(*overrides(root, f"data.in_memory={str(in_memory).lower()}"))
    with pytest.raises(PCamDataError, match=f"{damaged} could not be read") as err:
        pipeline.run(cfg, run_dir=tmp_path / "run")
    assert "delete the directory" in str(err.value)  # synthetic: it is generated again
    assert not (tmp_path / "run" / "best.pt").exists()  # found before any training


# ---------------------------------------------------------------- writes


def test_a_full_disk_names_the_directory_and_the_bytes_needed(tmp_path: Path, monkeypatch) -> None:
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 576 vs 470")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(disk.DiskFullError) as err:
        disk.torch_save({"w": torch.zeros(1000)}, tmp_path / "best.pt")
    assert err.value.errno == errno.ENOSPC
    assert f"into {tmp_path} needs about 4,000 bytes" in str(err.value) and "bytes are free there" in str(err.value)
    assert list(tmp_path.iterdir()) == []  # no temp file left

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk.os, "fsync", no_space)
    with pytest.raises(disk.DiskFullError, match="needs about 12 bytes"):
        disk.write_text(tmp_path / "metrics.json", "x" * 12)


def test_results_are_readable_as_the_umask_allows_and_stale_temps_are_removed(small_pcam: Path,
                                                                              tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "compressed").mkdir(parents=True)
    stale = [run_dir / ".resume.pt.k3j2h1.tmp", run_dir / "compressed" / ".model.safetensors.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a file from a killed write")
    pipeline.run(compose_config(*overrides(small_pcam)), run_dir=run_dir)
    assert not any(p.exists() for p in stale)
    for name in ("metrics.json", "best.pt", "predictions.csv", "resolved_config.yaml"):
        assert stat.S_IMODE((run_dir / name).stat().st_mode) == 0o666 & ~disk.UMASK, name


# ---------------------------------------------------------------- make bench on a venv without torchvision


@pytest.mark.slow
def test_bench_imports_and_explains_without_torchvision() -> None:
    for missing in ("torchvision", "tifffile"):
        code = (f"import sys; sys.modules['{missing}'] = None\n"
                "from benchmarks.cli import build_parser, main\n"
                "assert build_parser().parse_args(['--quick']).quick\n"
                "main(['--quick', '--out', 'never-written.json'])\n")
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"{missing} is missing" in proc.stderr and "pip install -e '.[bench]'" in proc.stderr
        assert not (REPO / "never-written.json").exists()


# ---------------------------------------------------------------- a sweep job lost to SIGKILL


@pytest.mark.slow
def test_a_sweep_job_killed_with_sigkill_still_gets_its_table(small_pcam: Path, tmp_path: Path) -> None:
    """What OOM, scancel or a node failure do to a Slurm job, with submitit's local executor: the job's
    process dies without a result. The sweep still writes its tables, with the job as a failed row."""
    sweep = tmp_path / "sweep"
    fast = [o for o in fast_overrides(small_pcam) if not o.startswith("hardware=")]
    command = [sys.executable, "run.py", "-m", "hardware=submitit_local", *fast, "hardware.num_threads=1",
               "train.epochs=1,400", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})
    victim, deadline = None, time.time() + 180
    while victim is None and time.time() < deadline and proc.poll() is None:
        for log in (sweep / ".submitit").glob("*/*_log.*"):
            if "400 epochs" in _read(log):  # the long job has started training
                victim = int(log.parent.name)  # local job ids are process ids
        time.sleep(0.3)
    assert victim is not None, "the long job never started"
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    import csv

    with open(sweep / "summary.csv", newline="") as f:
        rows = {r["job"]: r for r in csv.DictReader(f)}
    assert rows["0"]["status"] == "ok" and rows["1"]["status"] == "failed"
    assert "ended without a result" in rows["1"]["error"] and "killed" in rows["1"]["error"]
    assert rows["1"]["override.train.epochs"] == "400"
    assert json.loads((sweep / "1" / "metrics.json").read_text())["reason"] == "lost"
    assert "1 failed" in (sweep / "summary.md").read_text() and (sweep / "roc.png").is_file()


# ---------------------------------------------------------------- one line, not a traceback


@pytest.mark.parametrize("case", ["tau", "data", "checkpoint"])
def test_a_known_error_prints_one_line_naming_the_key_or_file_and_exits_2(
        small_pcam: Path, tmp_path: Path, case: str, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    extra, named = {"tau": (["prune=heads", "prune.tau=1.5"], "prune.tau"),
                    "data": ([f"data.root={tmp_path / 'nowhere'}"], str(tmp_path / "nowhere")),
                    "checkpoint": ([f"checkpoint={garbage}"], str(garbage))}[case]
    monkeypatch.setattr(pipeline, "resolve_run_dir", lambda _: tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as exit_:
        pipeline.run_job(compose_config(*fast_overrides(small_pcam, *extra)))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(SystemExit):
        pipeline.run_job(compose_config(*fast_overrides(small_pcam, *extra)))
    assert "Traceback" in capsys.readouterr().err  # the whole story on request


def test_an_unexpected_error_keeps_its_traceback(small_pcam: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "resolve_run_dir", lambda _: tmp_path)

    def broken(_):
        raise KeyError("a bug")

    monkeypatch.setattr(pipeline, "load_data", broken)
    with pytest.raises(KeyError, match="a bug"):
        pipeline.run_job(compose_config(*fast_overrides(small_pcam)))
