"""The shared core: configs, checkpoints, schedulers, the sampling loop, CFG, the training loop, images."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from unclip import checkpoint
from unclip.config import config_from_dict, config_to_dict
from unclip.images import load_image, make_grid, pil_to_tensor, read_png_metadata, save_gif, save_png, tensor_to_pil
from unclip.sampling import denoise, guided
from unclip.schedulers import make_scheduler, scheduler_names
from unclip.training import Hooks, StepBatchSampler, TrainConfig, TrainingError, list_checkpoints, train


@dataclasses.dataclass
class ToyConfig:
    width: int = 4
    scale: float = 1.0
    channels: tuple[int, ...] = (1, 2)
    name: str = "toy"


# ---------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = ToyConfig(width=8, channels=(3, 4))
    assert config_from_dict(ToyConfig, json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    assert config_from_dict(ToyConfig, {"scale": 2}).scale == 2.0  # int -> float is lossless
    with pytest.raises(ValueError, match="unknown config keys"):
        config_from_dict(ToyConfig, {"widht": 3})
    with pytest.raises(ValueError, match="width"):
        config_from_dict(ToyConfig, {"width": "eight"})
    with pytest.raises(ValueError, match="width"):
        config_from_dict(ToyConfig, {"width": True})


# ---------------------------------------------------------------- checkpoint


def test_component_round_trip_and_errors(tmp_path):
    state = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    checkpoint.save_component(tmp_path / "prior", "prior", ToyConfig(), state, scheduler_config={"a": 1})
    cfg, loaded = checkpoint.load_component(tmp_path / "prior", "prior", ToyConfig)
    assert cfg == ToyConfig() and torch.equal(loaded["w"], state["w"]) and torch.equal(loaded["b"], state["b"])
    assert checkpoint.load_scheduler_config(tmp_path / "prior") == {"a": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind

    with pytest.raises(ValueError, match="expected 'decoder'"):
        checkpoint.load_component(tmp_path / "prior", "decoder", ToyConfig)
    with pytest.raises(ValueError, match="missing prior component"):
        checkpoint.load_component(tmp_path / "nope", "prior", ToyConfig)
    (tmp_path / "prior" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="corrupt weights"):
        checkpoint.load_component(tmp_path / "prior", "prior", ToyConfig)
    (tmp_path / "prior" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt JSON"):
        checkpoint.load_component(tmp_path / "prior", "prior", ToyConfig)


def test_format_version_and_model_index(tmp_path):
    checkpoint.save_component(tmp_path / "m" / "prior", "prior", ToyConfig(), {"w": torch.zeros(1)})
    index = checkpoint.update_model_index(tmp_path / "m")
    assert index["components"] == {"prior": "prior"}
    data = json.loads((tmp_path / "m" / "prior" / "config.json").read_text())
    data["_format_version"] = 99
    (tmp_path / "m" / "prior" / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version 99"):
        checkpoint.load_component_config(tmp_path / "m" / "prior", "prior", ToyConfig)


def test_load_weights_into_reports_mismatch():
    with pytest.raises(ValueError, match="do not fit"):
        checkpoint.load_weights_into(torch.nn.Linear(2, 3), {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, "x")


# ---------------------------------------------------------------- schedulers, loop, guidance


@pytest.mark.parametrize("name", [n for n in scheduler_names() if n != "ddim-inverse"])
def test_every_scheduler_denoises_a_point_mass(name):
    """With the exact x0-predictor of a point mass at 0.5, every sampler must land on 0.5."""
    scheduler = make_scheduler(name, {"prediction_type": "sample"})
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    out = denoise(lambda x_t, t: torch.full_like(x_t, 0.5), x, scheduler, 8,
                  generator=torch.Generator().manual_seed(1), progress=False)
    assert torch.allclose(out, torch.full_like(out, 0.5), atol=1e-3)


def test_ddim_inversion_round_trip():
    """DDIM inversion then DDIM sampling with the same eps model returns the starting point."""
    alphas = make_scheduler("ddim").alphas_cumprod

    def eps_model(x_t, t):  # the exact eps of data ~ N(0, 0.25): the probability-flow ODE is smooth
        a = alphas[int(t)]
        return (1 - a).sqrt() * x_t / (0.25 * a + 1 - a)
    x0 = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    noise = denoise(eps_model, x0, make_scheduler("ddim-inverse"), 50, progress=False)
    back = denoise(eps_model, noise, make_scheduler("ddim"), 50, progress=False)
    assert (back - x0).abs().max() < 0.1 and (noise - x0).abs().max() > 1.0


def test_guided_combines_branches_in_one_batch():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return torch.zeros_like(x) + c[:, None]

    zero, one, two = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    out = guided(model, [{"c": zero}, {"c": one}], [3.0])(torch.zeros(2, 1), torch.tensor(10))
    assert torch.allclose(out, torch.full_like(out, 3.0)) and calls == [4]
    out = guided(model, [{"c": zero}, {"c": one}, {"c": two}], [2.0, 3.0])(torch.zeros(2, 1), torch.tensor(1))
    assert torch.allclose(out, torch.full_like(out, 5.0)) and calls[-1] == 6
    out = guided(model, [{"c": zero}, {"c": one}], [1.0])(torch.zeros(2, 1), torch.tensor(1))
    assert torch.allclose(out, torch.ones_like(out)) and calls[-1] == 2  # scale 1: no unconditional branch
    with pytest.raises(ValueError, match="finite"):
        guided(model, [{"c": zero}, {"c": one}], [math.nan])
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("nope")


def test_guided_in_an_interval_runs_the_conditioned_branch_alone_outside_it():
    calls = []

    def model(x, t, c):
        calls.append(x.shape[0])
        return torch.zeros_like(x) + c[:, None]

    model_fn = guided(model, [{"c": torch.zeros(2)}, {"c": torch.ones(2)}], [3.0], interval=(300, 700))
    inside, low, high = (model_fn(torch.zeros(2, 1), torch.tensor(t)) for t in (500, 100, 900))
    assert torch.allclose(inside, torch.full((2, 1), 3.0)) and calls == [4, 2, 2]
    assert torch.allclose(low, torch.ones(2, 1)) and torch.allclose(high, torch.ones(2, 1))  # scale 1 there
    with pytest.raises(ValueError, match="low <= high"):
        guided(model, [{"c": torch.zeros(2)}, {"c": torch.ones(2)}], [3.0], interval=(700, 300))


def test_guided_prepares_the_condition_once():
    """A model with prepare_condition encodes the batched condition once for the whole loop."""
    class Prepared:
        prepared = 0

        def prepare_condition(self, c):
            self.prepared += 1
            return lambda x, t: torch.zeros_like(x) + c[:, None]

    model = Prepared()
    model_fn = guided(model, [{"c": torch.zeros(2)}, {"c": torch.ones(2)}], [3.0])
    x = denoise(model_fn, torch.zeros(2, 1), make_scheduler("ddim"), 5, progress=False)
    assert model.prepared == 1 and x.shape == (2, 1)
    assert torch.allclose(model_fn(torch.zeros(2, 1), torch.tensor(1)), torch.full((2, 1), 3.0))


# ---------------------------------------------------------------- training loop


class Line(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        if i == 13:
            raise ValueError("corrupt sample")
        x = torch.tensor([i / 64.0])
        return {"x": x, "y": 2 * x + 1}


def line_loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def test_training_converges_checkpoints_and_resumes_exactly(tmp_path):
    config = TrainConfig(steps=40, batch_size=8, lr=0.2, warmup_steps=2, checkpoint_every=20, ema_decay=0.5,
                         log_every=5)
    torch.manual_seed(0)
    straight = train(torch.nn.Linear(1, 1), line_loss, Line(), tmp_path / "a", config, progress=False)
    torch.manual_seed(0)
    half = train(torch.nn.Linear(1, 1), line_loss, Line(), tmp_path / "b",
                 dataclasses.replace(config, steps=20), progress=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [20]
    resumed = train(torch.nn.Linear(1, 1), line_loss, Line(), tmp_path / "b", config, resume=True, progress=False)
    assert torch.allclose(resumed.weight, straight.weight) and torch.allclose(resumed.bias, straight.bias)
    assert abs(float(straight.weight) - 2) < 0.3
    metrics = (tmp_path / "a" / "metrics.csv").read_text()
    assert "skipped_samples" in metrics and ",loss," in metrics
    assert json.loads((tmp_path / "a" / "train_config.json").read_text())["train"]["steps"] == 40
    with pytest.raises(ValueError, match="--resume"):
        train(torch.nn.Linear(1, 1), line_loss, Line(), tmp_path / "a", config, progress=False)


def test_training_stops_on_nan_and_keeps_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        return line_loss(model, batch) * (float("nan") if calls["n"] > 6 else 1.0)

    with pytest.raises(TrainingError, match="step-00000005"):
        train(torch.nn.Linear(1, 1), loss_fn, Line(), tmp_path, TrainConfig(steps=20, batch_size=4,
              checkpoint_every=5), progress=False)


def test_hooks_export_sample_evaluate(tmp_path):
    seen = {"export": [], "eval": []}
    hooks = Hooks(export=lambda ema, step: seen["export"].append(step),
                  sample=lambda ema, step: Image.new("RGB", (4, 4)),
                  evaluate=lambda ema, step: seen["eval"].append(step) or {"metric": 1.0})
    train(torch.nn.Linear(1, 1), line_loss, Line(), tmp_path, TrainConfig(steps=6, batch_size=4, checkpoint_every=3,
          sample_every=3, eval_every=2), hooks=hooks, progress=False)
    assert seen["export"] == [3, 6] and seen["eval"] == [2, 4, 6]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]


def test_batch_sampler_splits_ranks_and_resumes():
    one = StepBatchSampler(10, 4, rank=0, world=1, seed=0, start_sample=0)
    it = iter(one)
    single = [next(it) for _ in range(5)]  # 20 samples: two epochs
    ranks = [iter(StepBatchSampler(10, 2, rank=r, world=2, seed=0, start_sample=0)) for r in range(2)]
    for batch in single:
        assert next(ranks[0]) + next(ranks[1]) == batch  # two processes see the same global batch
    later = iter(StepBatchSampler(10, 4, rank=0, world=1, seed=0, start_sample=12))
    assert next(later) == single[3]
    assert sorted(single[0] + single[1] + single[2][:2]) == list(range(10))  # each epoch is a permutation


# ---------------------------------------------------------------- images


def test_image_conversions_and_files(tmp_path):
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))
    (tmp_path / "a.png").write_bytes(b"")
    rgba.save(tmp_path / "b.png")
    assert load_image(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "c.png")
    assert load_image(tmp_path / "c.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("P", (4, 4), 0).save(tmp_path / "d.png")
    assert load_image(tmp_path / "d.png").mode == "RGB"
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="not found"):
        load_image(tmp_path / "zzz.png")
    x = pil_to_tensor([Image.new("RGB", (12, 8), (0, 255, 128))], size=8)
    assert x.shape == (1, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert tensor_to_pil(x)[0].getpixel((3, 3)) == (0, 255, 128)
    save_png(tensor_to_pil(x)[0], tmp_path / "m.png", {"prompt": "a red circle", "seed": 3})
    assert read_png_metadata(tmp_path / "m.png") == {"prompt": "a red circle", "seed": "3"}
    assert make_grid(tensor_to_pil(x.repeat(3, 1, 1, 1)), cols=2, pad=1).size == (19, 19)
    save_gif(tensor_to_pil(torch.cat([x, -x])), tmp_path / "a.gif")
    assert Image.open(tmp_path / "a.gif").n_frames == 2
