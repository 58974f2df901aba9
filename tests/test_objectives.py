import math

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_modules.objectives import (
    diffusion_loss,
    drop_captions,
    min_snr_weights,
    prediction_target,
    sample_noise,
    sample_timesteps,
)


def sd_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
    )


def alpha_bar(t: int) -> float:
    """Cumulative product of (1 - beta) for SD's scaled-linear schedule, by hand."""
    betas = [
        (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / 999) ** 2 for i in range(1000)
    ]
    return math.prod(1 - b for b in betas[: t + 1])


def test_epsilon_target_is_the_noise():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    target = prediction_target(sd_scheduler(), latents, noise, torch.tensor([10, 900]))
    assert torch.equal(target, noise)


def test_v_prediction_target_matches_hand_computation():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([0, 700])
    target = prediction_target(sd_scheduler("v_prediction"), latents, noise, timesteps)
    for i, t in enumerate(timesteps.tolist()):
        a = alpha_bar(t)
        expected = math.sqrt(a) * noise[i] - math.sqrt(1 - a) * latents[i]
        torch.testing.assert_close(target[i], expected, rtol=1e-4, atol=1e-5)


def test_unknown_prediction_type_is_rejected():
    scheduler = sd_scheduler()
    scheduler.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="sample"):
        prediction_target(scheduler, torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([1]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_hand_computation(prediction_type):
    timesteps = torch.tensor([0, 50, 400, 999])
    weights = min_snr_weights(sd_scheduler(prediction_type), timesteps, gamma=5.0)
    for w, t in zip(weights.tolist(), timesteps.tolist(), strict=True):
        a = alpha_bar(t)
        snr = a / (1 - a)
        denominator = snr + 1 if prediction_type == "v_prediction" else snr
        assert w == pytest.approx(min(snr, 5.0) / denominator, rel=1e-4)


def test_weighted_loss_is_the_weighted_mean_of_per_sample_mse():
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    # per-sample MSE: 1.0 and 2.0
    assert diffusion_loss(pred, target).item() == pytest.approx(1.5)
    assert diffusion_loss(pred, target, torch.tensor([2.0, 0.5])).item() == pytest.approx(1.5)
    assert diffusion_loss(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)


def test_noise_offset_shifts_each_channel_by_a_constant():
    latents = torch.zeros(3, 4, 16, 16)
    plain = sample_noise(latents, 0.0, torch.Generator().manual_seed(1))
    shifted = sample_noise(latents, 0.5, torch.Generator().manual_seed(1))
    difference = shifted - plain
    # The same base noise; the offset is constant over each image's channel and not zero.
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    assert difference.abs().amax() > 0


def test_timesteps_stay_in_range_and_bad_ranges_fail():
    t = sample_timesteps(5000, 1000, min_timestep=200, max_timestep=300)
    assert t.min() >= 200 and t.max() < 300 and t.dtype == torch.long
    assert len(t.unique()) == 100  # every value of the range is reachable
    with pytest.raises(ValueError, match="timestep range"):
        sample_timesteps(4, 1000, min_timestep=10, max_timestep=10)


def test_caption_dropout_replaces_whole_captions():
    ids = torch.arange(40).reshape(8, 5)
    empty = torch.tensor([100, 101, 101, 101, 101])
    assert torch.equal(drop_captions(ids, empty, 0.0), ids)
    assert torch.equal(drop_captions(ids, empty, 1.0), empty.expand(8, 5))
    mixed = drop_captions(ids, empty, 0.5, torch.Generator().manual_seed(0))
    dropped = (mixed == empty).all(dim=1)
    kept = (mixed == ids).all(dim=1)
    assert torch.equal(dropped | kept, torch.ones(8, dtype=torch.bool))
    assert 0 < dropped.sum() < 8


def test_caption_dropout_drops_a_caption_from_every_part_of_its_conditioning():
    # SDXL / FLUX: token states and a pooled vector; one draw decides for both.
    states = torch.arange(8 * 3 * 2, dtype=torch.float32).reshape(8, 3, 2)
    pooled = torch.arange(8 * 4, dtype=torch.float32).reshape(8, 4) + 1000
    empty = {"prompt_embeds": torch.full((1, 3, 2), -1.0), "pooled": torch.full((1, 4), -2.0)}
    dropped = drop_captions(
        {"prompt_embeds": states, "pooled": pooled}, empty, 0.5, torch.Generator().manual_seed(0)
    )
    states_dropped = (dropped["prompt_embeds"] == -1).flatten(1).all(dim=1)
    pooled_dropped = (dropped["pooled"] == -2).all(dim=1)
    assert torch.equal(states_dropped, pooled_dropped) and 0 < pooled_dropped.sum() < 8
    assert torch.equal(dropped["pooled"][~pooled_dropped], pooled[~pooled_dropped])
    # The same draw as for a single tensor: the rows dropped are those `torch.rand(8) < 0.5` picks.
    expected = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(pooled_dropped, expected)
