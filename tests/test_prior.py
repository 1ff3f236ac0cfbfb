"""The diffusion prior: model, loss, sampling, training, embeddings files, evaluation and CLI (tiny, CPU)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import Dataset

import cli
from prior.config import PRIOR_PRESETS, PriorConfig
from prior.loss import prior_loss
from prior.model import DiffusionPrior
from prior.sample import sample_prior
from prior.training import PriorDataset, train_prior
from unclip.checkpoint import read_model_index
from unclip.data.embeddings import embed_pairs, read_embeddings, write_embeddings
from unclip.eval.metrics import frechet_distance
from unclip.eval.prior import caption_mean_ceiling, evaluate_prior, unrelated_cosine
from unclip.schedulers import scheduler_names
from unclip.training import TrainConfig, list_checkpoints, train

CAPTIONS = ["a large red circle", "a small blue square", "two green triangles", "a yellow circle on the left",
            "a red square above a blue circle", "three purple circles"]


def tiny_config(**kw) -> PriorConfig:
    return PriorConfig(**{**dict(embed_dim=16, text_width=32, context_length=16, width=32, depth=2, heads=2), **kw})


class TinyPairs(Dataset):
    """Items like ImageTextFolder's: {"image": [3, 16, 16] in [-1, 1], "caption", "key"}; counts reads."""

    def __init__(self, n: int = 12):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
        self.reads = 0

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.images[i], "caption": self.captions[i], "key": f"{i:05d}"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def prior() -> DiffusionPrior:
    """A random tiny prior whose output layer is not zero (so samples differ) and with set statistics."""
    torch.manual_seed(0)
    model = DiffusionPrior(tiny_config())
    torch.nn.init.normal_(model.transformer.project_out.weight, std=0.3)
    model.set_image_statistics(torch.randn(32, 16) * 0.2 + 0.1)
    return model.eval()


@pytest.fixture
def text(tiny_clip):
    # text_emb [3, 16], text_tokens [3, 16, 32], mask [3, 16] (cloned out of inference mode for backward)
    return tuple(t.clone() for t in tiny_clip.encode_text(CAPTIONS[:3]))


# ---------------------------------------------------------------- the network


def test_forward_shape_and_padding_mask(prior, text):
    text_emb, tokens, mask = text
    x_t = torch.randn(3, 16)
    out = prior(x_t, torch.tensor([5, 500, 999]), text_emb, tokens, mask)
    assert out.shape == (3, 16)
    assert prior(x_t, torch.tensor(10), text_emb, tokens, mask).shape == (3, 16)  # a scalar t broadcasts
    noisy_padding = torch.where(mask[..., None], tokens, torch.randn_like(tokens))  # padding tokens changed
    torch.testing.assert_close(prior(x_t, 10, text_emb, noisy_padding, mask), prior(x_t, 10, text_emb, tokens, mask))
    with pytest.raises(ValueError, match="text_tokens"):
        prior(x_t, 10, text_emb, tokens[:, :4], mask)


def test_prepared_condition_equals_the_full_forward(prior, text):
    """The cached text prefix gives the full sequence's output at every step, with or without dropped text."""
    text_emb, tokens, mask = text
    drop = torch.tensor([True, False, False])
    with torch.inference_mode():
        network = prior.prepare_condition(text_emb, tokens, mask, force_drop=drop)
        for t in (999, 500, 3):  # one prefix serves every step
            x_t = torch.randn(3, 16)
            torch.testing.assert_close(network(x_t, t), prior(x_t, t, text_emb, tokens, mask, force_drop=drop))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x_t = torch.randn(3, 16)
            torch.testing.assert_close(prior.prepare_condition(text_emb, tokens, mask)(x_t, 10).float(),
                                       prior(x_t, 10, text_emb, tokens, mask).float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="x_t"):
        network(torch.randn(2, 16), 10)


def test_sampling_with_the_cached_prefix_equals_sampling_the_whole_sequence(prior, text):
    latents = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0))
    cached = sample_prior(prior, *text, num_steps=4, latents=latents, progress=False)
    prior.prepare_condition = None  # unclip.sampling.guided then runs the whole sequence at every step
    whole = sample_prior(prior, *text, num_steps=4, latents=latents, progress=False)
    torch.testing.assert_close(cached["candidates"], whole["candidates"], atol=1e-5, rtol=1e-4)


def test_loss_finite_and_backward_reaches_every_parameter(prior, text):
    text_emb, tokens, mask = text
    prior.train()
    batch = dict(image_emb=torch.randn(3, 16), text_emb=text_emb, text_tokens=tokens, mask=mask)
    loss = prior_loss(prior, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in prior.parameters())
    prior.zero_grad()
    out = prior(torch.randn(3, 16), torch.tensor([1, 2, 3]), text_emb, tokens, mask,
                force_drop=torch.tensor([True, False, False]))  # the null tokens are used by one sample
    out.square().mean().backward()
    dead = [n for n, p in prior.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"no gradient reaches {dead}"
    with pytest.raises(ValueError, match="image_emb"):
        prior_loss(prior, {"text_emb": text_emb})


def test_save_load_identical(prior, text, tmp_path):
    prior.save(tmp_path / "prior")
    loaded = DiffusionPrior.load(tmp_path / "prior")
    args = (torch.randn(3, 16), torch.tensor([3, 30, 300]), *text)
    torch.testing.assert_close(loaded(*args), prior(*args), rtol=0, atol=0)
    torch.testing.assert_close(loaded.image_std, prior.image_std)
    schedule = json.loads((tmp_path / "prior" / "scheduler_config.json").read_text())
    assert schedule["prediction_type"] == "sample"
    schedule["prediction_type"] = "epsilon"
    (tmp_path / "prior" / "scheduler_config.json").write_text(json.dumps(schedule))
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionPrior.load(tmp_path / "prior")


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(heads=3)
    assert cli.PRIOR_PRESET_NAMES == list(PRIOR_PRESETS)
    assert set(cli.PRIOR_SAMPLERS) <= set(scheduler_names())


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "unipc", "euler"])
def test_every_scheduler_samples(prior, text, name):
    out = sample_prior(prior, *text, scheduler=name, num_steps=3, generator=torch.Generator().manual_seed(0),
                       progress=False)
    assert out["image_emb"].shape == (3, 16) and out["candidates"].shape == (3, 2, 16)
    assert torch.isfinite(out["image_emb"]).all()
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(3))


def test_candidates_keep_the_better_one(prior, text):
    latents = torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(1))
    both = sample_prior(prior, *text, num_steps=3, candidates=2, latents=latents, progress=False)
    alone = [sample_prior(prior, *text, num_steps=3, candidates=1, latents=latents[:, i:i + 1], progress=False)
             for i in range(2)]
    scores = torch.cat([a["scores"] for a in alone], dim=1)                    # [3, 2]
    torch.testing.assert_close(both["scores"], scores, atol=1e-5, rtol=1e-5)
    expected = torch.stack([alone[int(i)]["image_emb"][b] for b, i in enumerate(scores.argmax(dim=1))])
    torch.testing.assert_close(both["image_emb"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0]["image_emb"], alone[1]["image_emb"])


def test_negative_prompt_changes_the_output(prior, text, tiny_clip):
    latents = torch.randn(3, 1, 16, generator=torch.Generator().manual_seed(2))
    plain = sample_prior(prior, *text, num_steps=3, candidates=1, latents=latents, progress=False)
    negative = tiny_clip.encode_text(["a green triangle"])
    steered = sample_prior(prior, *text, num_steps=3, candidates=1, latents=latents, negative=negative,
                           progress=False)
    assert not torch.allclose(plain["image_emb"], steered["image_emb"], atol=1e-4)
    with pytest.raises(ValueError, match="triple"):
        sample_prior(prior, *text, num_steps=3, negative=negative[0], progress=False)


def test_negative_scale_adds_a_push_away_from_the_negative(prior, text, tiny_clip):
    latents = torch.randn(3, 1, 16, generator=torch.Generator().manual_seed(2))
    run = lambda **kw: sample_prior(prior, *text, num_steps=3, candidates=1, latents=latents,  # noqa: E731
                                    progress=False, **kw)["image_emb"]
    plain = run()
    # a row whose negative is its own prompt is guided as without one; a scale of 0 changes nothing
    torch.testing.assert_close(run(negative=text, negative_scale=2.0), plain, atol=1e-5, rtol=1e-5)
    other = tiny_clip.encode_text(["a green triangle"] * 3)
    torch.testing.assert_close(run(negative=other, negative_scale=0.0), plain, atol=1e-5, rtol=1e-5)
    pushed, replaced = run(negative=other, negative_scale=2.0), run(negative=other)
    assert not torch.allclose(pushed, plain, atol=1e-4) and not torch.allclose(pushed, replaced, atol=1e-4)
    # per row: only the row with a different negative moves
    mixed = tuple(torch.cat([o[:1], t[1:]]) for o, t in zip(other, text))
    rows = run(negative=mixed, negative_scale=2.0)
    torch.testing.assert_close(rows[1:], plain[1:], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rows[:1], plain[:1], atol=1e-4)
    with pytest.raises(ValueError, match="negative_scale"):
        run(negative=other, negative_scale=-1.0)


# ---------------------------------------------------------------- training


def _synthetic_embeddings(n: int = 64) -> dict:
    """Encoded pairs where image_emb is a fixed function of the text (so the prior can learn it)."""
    g = torch.Generator().manual_seed(3)
    tokens, mask = torch.randn(6, 16, 32, generator=g).half(), torch.ones(6, 16, dtype=torch.bool)
    text_emb = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    image_emb = torch.nn.functional.normalize(text_emb @ torch.randn(16, 16, generator=g), dim=-1)
    index = torch.arange(n) % 6
    return {"image_emb": image_emb[index], "text_emb": text_emb[index], "text_tokens": tokens, "mask": mask,
            "index": index, "captions": [CAPTIONS[int(i)] for i in index]}


def test_a_few_training_steps_lower_the_loss(tmp_path):
    torch.manual_seed(0)
    emb = _synthetic_embeddings()
    model = DiffusionPrior(tiny_config())
    model.set_image_statistics(emb["image_emb"])
    dataset = PriorDataset(emb, torch.arange(64))
    batch = torch.utils.data.default_collate([dataset[i] for i in range(64)])

    def eval_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return float(sum(prior_loss(model, batch) for _ in range(4)) / 4)

    before = eval_loss()
    config = TrainConfig(steps=20, batch_size=32, lr=3e-3, warmup_steps=1, checkpoint_every=1000, cpu=True)
    train(model, prior_loss, dataset, tmp_path / "run", config, progress=False)
    assert eval_loss() < 0.5 * before


def test_train_prior_exports_ema_and_resumes(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path / "model" / "clip")
    config = TrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2, cpu=True)
    data = TinyPairs(20)
    ema = train_prior(tmp_path / "model", data=data, train_config=config, config=tiny_config(), eval_steps=2,
                      progress=False)
    assert read_model_index(tmp_path / "model")["components"] == {"clip": "clip", "prior": "prior"}
    loaded = DiffusionPrior.load(tmp_path / "model" / "prior")
    torch.testing.assert_close(loaded.state_dict(), ema.state_dict())
    metrics = (tmp_path / "model" / "runs" / "prior" / "metrics.csv").read_text()
    assert "heldout_cos_pred_c1" in metrics
    with pytest.raises(ValueError, match="exactly one"):
        train_prior(tmp_path / "model", train_config=config)
    config.steps = 3  # resume picks up the recorded config even without `config=`
    train_prior(tmp_path / "model", data=data, train_config=config, resume=True, eval_steps=2, progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path / "model" / "runs" / "prior")] == [2, 3]


# ---------------------------------------------------------------- embeddings files


def test_embeddings_round_trip_and_shard_resume(tiny_clip, tmp_path):
    data = TinyPairs(10)
    result = write_embeddings(tiny_clip, data, tmp_path / "emb", shard_size=4, progress=False)
    assert result == {"shards": 3, "written": 3, "skipped": 0, "count": 10}
    emb = read_embeddings(tmp_path / "emb")
    assert emb["captions"] == data.captions and emb["keys"][3] == "00003"
    torch.testing.assert_close(emb["image_emb"], tiny_clip.encode_image(data.images), atol=2e-3, rtol=0)
    torch.testing.assert_close(emb["text_emb"], tiny_clip.encode_text(data.captions)[0], atol=2e-3, rtol=0)

    (tmp_path / "emb" / "metadata" / "metadata_1.parquet").unlink()  # an unfinished shard
    with pytest.raises(ValueError, match="incomplete shard 1"):
        read_embeddings(tmp_path / "emb")
    data.reads = 0
    result = write_embeddings(tiny_clip, data, tmp_path / "emb", shard_size=4, progress=False)
    assert (result["written"], result["skipped"], data.reads) == (1, 2, 4)
    torch.testing.assert_close(read_embeddings(tmp_path / "emb")["image_emb"], emb["image_emb"])
    with pytest.raises(ValueError, match="shard_size"):
        write_embeddings(tiny_clip, data, tmp_path / "emb", shard_size=5, progress=False)
    stream = _Stream(data)  # an IterableDataset (webdataset shards) gives the same files
    write_embeddings(tiny_clip, stream, tmp_path / "emb2", shard_size=4, progress=False)
    torch.testing.assert_close(read_embeddings(tmp_path / "emb2")["image_emb"], emb["image_emb"])
    result = write_embeddings(tiny_clip, stream, tmp_path / "emb2", shard_size=4, progress=False)
    assert (result["written"], result["skipped"], result["count"]) == (0, 3, 10)


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def test_read_embeddings_errors(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_embeddings(tmp_path / "nothing")
    write_embeddings(tiny_clip, TinyPairs(6), tmp_path / "emb", shard_size=6, progress=False)
    np.save(tmp_path / "emb" / "text_emb" / "text_emb_0.npy", np.zeros((5, 16), np.float16))
    with pytest.raises(ValueError, match="must match"):
        read_embeddings(tmp_path / "emb")
    np.save(tmp_path / "emb" / "text_emb" / "text_emb_0.npy", np.zeros((6, 8), np.float16))
    with pytest.raises(ValueError, match="same D"):
        read_embeddings(tmp_path / "emb")


def test_embed_pairs_rejects_embeddings_of_another_clip(tiny_clip, tmp_path):
    write_embeddings(tiny_clip, TinyPairs(6), tmp_path / "emb", progress=False)
    np.save(tmp_path / "emb" / "text_emb" / "text_emb_0.npy", np.random.randn(6, 16).astype(np.float16))
    with pytest.raises(ValueError, match="not made by this CLIP"):
        embed_pairs(tiny_clip, tmp_path / "emb", progress=False)


def test_evaluate_prior(tiny_clip, prior):
    report = evaluate_prior((tiny_clip, prior), TinyPairs(12), num_steps=2, progress=False)
    for key in ("cos_pred_c1", "cos_pred_c2", "cos_text", "cos_pred_unrelated", "cos_caption_mean"):
        assert -1 <= report[key] <= 1, key
    emb = embed_pairs(tiny_clip, TinyPairs(12), progress=False)
    assert report["fd_text"] == pytest.approx(frechet_distance(emb["text_emb"], emb["image_emb"]))
    assert report["fd_pred"] > 0 and report["fd_pred"] != pytest.approx(report["fd_text"])
    assert report["n"] == 12 and report["n_captions"] == 6
    same = torch.eye(16)[[0, 0, 1, 1, 2]]  # two captions repeated with identical embeddings, one single
    assert caption_mean_ceiling(same, ["a", "a", "b", "b", "c"]) == pytest.approx(1.0)
    assert unrelated_cosine(same, same, ["a", "a", "b", "b", "c"]) == pytest.approx(0.0)


# ---------------------------------------------------------------- command line


def _write_pairs(folder, n: int = 12) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])


def test_cli_embed_train_eval(tiny_clip, tmp_path):
    model, pairs, emb, report = tmp_path / "model", tmp_path / "pairs", tmp_path / "emb", tmp_path / "prior.json"
    tiny_clip.save(model / "clip")
    _write_pairs(pairs)
    runner = CliRunner()
    result = runner.invoke(cli.main, ["embed", "--data", str(pairs), "--clip", str(model), "--out", str(emb),
                                      "--shard-size", "5", "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(read_embeddings(emb)["captions"]) == 12
    result = runner.invoke(cli.main, ["train", "prior", "--model", str(model), "--embeddings", str(emb),
                                      "--steps", "2", "--batch-size", "4", "--warmup", "1", "--cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (model / "prior" / "model.safetensors").is_file()
    result = runner.invoke(cli.main, ["eval", "prior", "--model", str(model), "--data", str(pairs),
                                      "--out", str(report), "--steps", "2", "--limit", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["n"] == 6
    assert json.loads(result.output)["cos_text"] == json.loads(report.read_text())["cos_text"]


def test_cli_bad_arguments_give_one_line_errors(tiny_clip, tmp_path):
    tiny_clip.save(tmp_path / "model" / "clip")
    runner = CliRunner()
    result = runner.invoke(cli.main, ["train", "prior", "--model", str(tmp_path / "model"), "--quiet"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == ["Error: give exactly one of data (pairs) or embeddings "
                                                  "(a precomputed embeddings folder)"]
    result = runner.invoke(cli.main, ["eval", "prior", "--model", str(tmp_path / "model"), "--data", str(tmp_path)])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    result = runner.invoke(cli.main, ["train", "prior", "--model", str(tmp_path / "model"), "--preset", "huge"])
    assert result.exit_code == 2 and "huge" in result.output
