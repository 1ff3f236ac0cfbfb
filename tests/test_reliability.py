"""Faults: a training process killed with SIGKILL resumes exactly; half-written checkpoints are never used."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unclip.data.shapes import build_shapes
from unclip.training import list_checkpoints

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def prior_command(model: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "train", "prior", "--model", str(model), "--data", str(data),
            "--steps", str(steps), "--batch-size", "16", "--checkpoint-every", "2", "--heldout", "0",
            "--warmup", "2", "--quiet", *extra]


@pytest.fixture
def setup(tmp_path, tiny_clip):
    build_shapes(tmp_path / "shapes", n=60, seed=0, progress=False)
    for name in ("a", "b"):
        tiny_clip.save(tmp_path / name / "clip")
    return tmp_path


def test_sigkill_then_resume_matches_an_uninterrupted_run(setup):
    data = setup / "shapes" / "train"
    steps = 40
    straight = subprocess.run(prior_command(setup / "a", data, steps), env=ENV, capture_output=True, text=True,
                              cwd=Path(__file__).parents[1])
    assert straight.returncode == 0, straight.stderr

    victim = subprocess.Popen(prior_command(setup / "b", data, steps), env=ENV, cwd=Path(__file__).parents[1],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = setup / "b" / "runs" / "prior"
    deadline = time.time() + 600
    while time.time() < deadline and not [s for s, _ in list_checkpoints(run_dir) if s >= 6]:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = max(s for s, _ in list_checkpoints(run_dir))
    assert 6 <= killed_at < steps, "the kill should land mid-run"

    resumed = subprocess.run(prior_command(setup / "b", data, steps, "--resume"), env=ENV, capture_output=True,
                             text=True, cwd=Path(__file__).parents[1])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(setup / "a" / "prior" / "model.safetensors"))
    b = load_file(str(setup / "b" / "prior" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


def test_half_written_checkpoint_is_ignored(tmp_path):
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000004" / "training_state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / ".step-00000008.tmp-abc").mkdir()  # a kill during the write leaves only this
    (tmp_path / "checkpoints" / ".step-00000008.tmp-abc" / "training_state.pt").write_bytes(b"partial")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]


def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from unclip import training

    model = torch.nn.Linear(1, 1)
    ema = torch.nn.Linear(1, 1)
    model_state, opt_state = training.full_state(model, torch.optim.AdamW(model.parameters()))
    training.save_checkpoint(tmp_path, 2, model_state, ema, opt_state, 32, keep=2)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(training, "save_file", full)
    with pytest.raises(training.TrainingError, match="no space left"):
        training.save_checkpoint(tmp_path, 4, model_state, ema, opt_state, 64, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
