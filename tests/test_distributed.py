"""Two real processes on the CPU (`accelerate launch --multi_gpu --num_processes 2`, ACCELERATE_USE_CPU=1, gloo)
against one process.

One launch runs every distributed check (tests/distributed_driver.py); the one-process references run here.
Equivalence tolerance: 1e-5 max abs difference of every weight after 4 AdamW steps (float32; the runs differ
only in summation order: per-process batch 4 + gradient all-reduce vs one batch of 8).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import distributed_driver as driver
from conftest import SHAPES_WORDS, tiny_clip_config
from unclip.clip import ClipEncoder
from unclip.data.datasets import check_shard_split, open_dataset, write_shards
from unclip.data.embeddings import read_embeddings, write_embeddings
from unclip.training import SampleRandom, _check_whole_parameters, read_metrics

TOLERANCE = 1e-5
ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_pairs(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(4)
    for i in range(n):
        pixels = (torch.rand(8, 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"a {SHAPES_WORDS[8 + i % 6]} circle")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Prepare inputs, run the one-process references here, then the two-process driver once."""
    work = tmp_path_factory.mktemp("distributed")
    _write_pairs(work / "pairs", 16)
    write_shards(work / "pairs", work / "shards", shard_size=2)  # 8 shards = 2 processes x 2 workers x 2
    torch.manual_seed(0)
    ClipEncoder.from_config(tiny_clip_config(), sorted(set(SHAPES_WORDS))).save(work / "model" / "clip")
    driver.run_equivalence(work, 8, "1p")
    for name in ("resume", "resume-fsdp"):  # the 1-process run stopped at step 2
        _stopped_at_step_2(work / "runs" / "prior-1p", work / "runs" / name)

    # `--cpu --num_processes 2` would start ONE process (accelerate's simple launcher); torchrun's launcher with
    # ACCELERATE_USE_CPU=1 starts two CPU processes on gloo (DistributedType.MULTI_CPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "1"}
    _launch(work, env)
    # FSDP2 as `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP` sets
    # it (the driver applies it on CPU processes: tests/distributed_driver.py use_fsdp2_on_cpu): each model's
    # blocks (its `_no_split_modules`) and the rest are sharded as separate units over the 2 processes
    _launch(work, {**env, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"},
            "--fsdp")
    return work


def _launch(work: Path, env: dict, *args: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(ROOT / "tests" / "distributed_driver.py"), str(work),
               *args]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    (work / f"launch_stdout{''.join(args)}.txt").write_text(done.stdout)


def _stopped_at_step_2(run: Path, copy: Path) -> None:
    """A copy of a 4-step run as if it had stopped after its step-2 checkpoint."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / f"step-{driver.STEPS:08d}")
    lines = (copy / "metrics.csv").read_text().splitlines(keepends=True)
    (copy / "metrics.csv").write_text("".join(lines[:1] + [x for x in lines[1:] if int(x.split(",")[0]) <= 2]))


def _max_diff(a: Path, b: Path) -> float:
    """Max abs difference over all weights, except the key third of attention in_proj_bias (open_clip's CLIP).

    Softmax ignores a bias added to every key, so that bias has a zero gradient in exact arithmetic; in floats
    it gets rounding noise, which Adam divides by its own size into +-lr steps that differ between any two
    summation orders (1.1e-4 after 2 steps here, loss equal to 6 digits). Every other weight must agree.
    """
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    diffs = {k: (x[k].float() - y[k].float()).abs() for k in x}
    for k, d in diffs.items():
        if k.endswith("attn.in_proj_bias"):
            width = d.numel() // 3
            diffs[k] = torch.cat([d[:width], d[2 * width:]])  # [3W] -> [2W]: queries and values only
    return max(float(d.max()) for d in diffs.values())


def _checkpoint(work: Path, run: str) -> Path:
    return work / "runs" / run / "checkpoints" / f"step-{driver.STEPS:08d}"


@pytest.mark.parametrize("component, engine", [("prior", "2p"), ("decoder", "2p"), ("clip", "2p"),  # DDP
                                               ("prior", "fsdp"), ("decoder", "fsdp")])  # FSDP2
def test_two_processes_train_like_one_with_the_same_global_batch(work, component, engine):
    one, two = _checkpoint(work, f"{component}-1p"), _checkpoint(work, f"{component}-{engine}")
    start = driver.make_prior() if component == "prior" else None
    for name in ("model.safetensors", "ema.safetensors"):
        diff = _max_diff(one / name, two / name)
        print(f"{component} {name}: max abs difference 1 vs 2 processes ({engine}) {diff:.2e}")
        assert diff < TOLERANCE, (component, name, diff)
    if start is not None:  # and training moved the weights far more than that
        trained = load_file(str(one / "model.safetensors"))
        moved = max(float((v - start.state_dict()[k]).abs().max()) for k, v in trained.items())
        assert moved > 1e-3
    scale = json.loads((work / "runs" / f"{component}-{engine}" / "train_config.json").read_text())["distributed"]
    assert (scale["processes"], scale["global_batch"]) == (2, 8)
    assert scale["distributed_type"] == {"2p": "MULTI_CPU", "fsdp": "FSDP"}[engine]
    metrics = read_metrics(work / "runs" / f"{component}-{engine}" / "metrics.csv")
    assert {r["value"] for r in metrics if r["name"] == "global_batch"} == {8.0}
    assert [r["step"] for r in metrics if r["name"] == "loss"] == [1, 2, 3, 4]  # written once (main process)


@pytest.mark.parametrize("run", ["resume", "resume-fsdp"])
def test_checkpoint_of_one_process_resumes_with_two(work, run):
    for name in ("model.safetensors", "ema.safetensors"):
        diff = _max_diff(_checkpoint(work, "prior-1p") / name, _checkpoint(work, run) / name)
        print(f"{run} 1 -> 2 processes: {name} max abs difference to the uninterrupted run {diff:.2e}")
        assert diff < TOLERANCE
    rows = [r for r in read_metrics(work / "runs" / run / "metrics.csv") if r["name"] == "processes"]
    assert [(r["step"], r["value"]) for r in rows] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0)]
    assert [r["samples_seen"] for r in rows] == [8, 16, 24, 32]


@pytest.mark.parametrize("component", ["prior", "decoder"])
def test_fsdp_shards_the_weights_and_ddp_does_not(work, component):
    fsdp = [json.loads((work / f"shards_{component}-fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    ddp = json.loads((work / f"shards_{component}-2p_rank0.json").read_text())
    assert ddp["dtensors"] == 0 and ddp["local"] == ddp["whole"]
    assert all(f["dtensors"] > 0 and f["whole"] == ddp["whole"] for f in fsdp)
    assert fsdp[0]["local"] + fsdp[1]["local"] >= ddp["whole"]  # every element held by some process ...
    assert max(f["local"] for f in fsdp) < 0.6 * ddp["whole"]  # ... and each process about half of them


def test_fsdp_hooks_get_the_whole_ema(work):
    rows = {r["name"]: r["value"] for r in read_metrics(work / "runs" / "resume-fsdp" / "metrics.csv")
            if r["step"] == driver.STEPS}
    saved = load_file(str(_checkpoint(work, "resume-fsdp") / "ema.safetensors"))
    assert rows["ema_dtensors"] == 0
    total = float(sum(v.double().sum() for v in saved.values()))
    assert rows["ema_sum"] == pytest.approx(total, abs=1e-4)  # metrics.csv keeps 6 significant digits


def test_fsdp_refuses_the_clip_with_one_line(work):
    for rank in (0, 1):  # every process raises before preparing (a raise on one alone would hang the other)
        message = (work / f"clip_fsdp_error_rank{rank}.txt").read_text()
        assert "logit_scale" in message and "DDP" in message and "\n" not in message
    assert not list((work / "runs" / "clip-fsdp" / "checkpoints").glob("step-*"))


def test_fsdp_checkpoint_resumes_in_one_process(work, tmp_path):
    """A 2-process FSDP2 run's step-2 checkpoint (whole weights, name-keyed optimizer state) continued by one
    plain process ends where the uninterrupted 1-process run does."""
    from prior.loss import prior_loss
    from unclip.training import train

    _stopped_at_step_2(work / "runs" / "prior-fsdp", tmp_path / "run")
    train(driver.make_prior(), prior_loss, driver.prior_data(), tmp_path / "run", driver.train_config(8), resume=True,
          progress=False)
    diff = _max_diff(_checkpoint(work, "prior-1p") / "model.safetensors", tmp_path / "run" / "checkpoints" /
                     f"step-{driver.STEPS:08d}" / "model.safetensors")
    print(f"FSDP2 2 -> 1 process resume: max abs difference to the uninterrupted run {diff:.2e}")
    assert diff < TOLERANCE


def test_gradient_accumulation_matches_the_same_global_batch(work, tmp_path):
    from prior.loss import prior_loss
    from unclip.training import train

    config = driver.train_config(4, grad_accum=2)
    train(driver.make_prior(), prior_loss, driver.prior_data(), tmp_path / "accum", config, progress=False)
    diff = _max_diff(_checkpoint(work, "prior-1p") / "model.safetensors",
                     tmp_path / "accum" / "checkpoints" / f"step-{driver.STEPS:08d}" / "model.safetensors")
    print(f"prior 1 process, batch 4 x 2 accumulation vs batch 8: max abs difference {diff:.2e}")
    assert diff < TOLERANCE


def test_streamed_shards_are_split_by_process_and_worker(work):
    keys = [json.loads((work / f"stream_keys_rank{r}.json").read_text()) for r in range(2)]
    assert sorted(keys[0] + keys[1]) == [f"{i:05d}" for i in range(16)]  # one epoch: every sample exactly once
    assert not set(keys[0]) & set(keys[1])


def test_parallel_embed_writes_one_shard_per_input_shard_and_restarts(work, tmp_path):
    lines = [x for x in (work / "launch_stdout.txt").read_text().splitlines() if "pairs in" in x]
    assert lines == [f"{work / 'emb'}: 16 pairs in 8 shards (8 written, 0 already complete)"]  # main only
    clip = ClipEncoder.load(work / "model" / "clip").eval()
    single = write_embeddings(clip, open_dataset(work / "shards", clip.image_size), tmp_path / "emb", progress=False)
    assert (single["shards"], single["written"], single["skipped"], single["count"]) == (8, 8, 0, 16)
    two, one = read_embeddings(work / "emb"), read_embeddings(tmp_path / "emb")
    assert two["keys"] == one["keys"] == [f"{i:05d}" for i in range(16)]
    assert float((two["image_emb"] - one["image_emb"]).abs().max()) < 1e-3  # float16 files
    (work / "emb" / "metadata" / "metadata_5.parquet").unlink()  # an interrupted run: shard 5 unfinished
    again = write_embeddings(clip, open_dataset(work / "shards", clip.image_size), work / "emb", progress=False)
    assert (again["written"], again["skipped"], again["count"]) == (1, 7, 16)
    with pytest.raises(ValueError, match="another list of input shards"):
        write_embeddings(clip, open_dataset(work / "shards" / "00000.tar"), work / "emb", progress=False)


def test_cli_prior_training_on_embeddings_under_two_processes(work):
    assert (work / "model" / "prior" / "model.safetensors").is_file()  # exported by the main process
    scale = json.loads((work / "model" / "runs" / "prior" / "train_config.json").read_text())["distributed"]
    assert scale["processes"] == 2 and scale["global_batch"] == 8
    # every process left the process group after the command, and only the main one said what it wrote
    assert [(work / f"group_after_cli_rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
    assert (work / "launch_stdout.txt").read_text().count(f"wrote {work / 'model'}/prior") == 1


def test_shard_split_rules():
    with pytest.raises(ValueError, match="cannot feed 4 processes"):
        check_shard_split(3, processes=4, workers=1)
    with pytest.warns(UserWarning, match="multiple of 4"):
        check_shard_split(6, processes=2, workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_shard_split(8, processes=2, workers=2)


def test_sample_random_does_not_depend_on_the_split():
    whole = SampleRandom.at_positions(7, 16, 8)
    halves = [SampleRandom.at_positions(7, 16, 4), SampleRandom.at_positions(7, 20, 4)]
    for draw in (lambda r: r.randn(3, 2), lambda r: r.rand(), lambda r: r.randint(1000)):
        assert torch.equal(draw(whole), torch.cat([draw(h) for h in halves]))


def test_engines_without_per_parameter_weights_are_refused():
    from accelerate.utils import DistributedType
    for kind, fsdp2 in ((DistributedType.FSDP, False), (DistributedType.DEEPSPEED, False)):
        with pytest.raises(ValueError, match="not supported"):
            _check_whole_parameters(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2))
    for kind, fsdp2 in ((DistributedType.MULTI_GPU, False), (DistributedType.FSDP, True)):
        _check_whole_parameters(SimpleNamespace(distributed_type=kind, is_fsdp2=fsdp2))
