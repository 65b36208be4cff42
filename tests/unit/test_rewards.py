"""Rewards registry, pair collection / storage and the Bradley-Terry reward model (components/preferences)."""
import json

import numpy as np
import pytest
import torch

from components.data.sources import make_toy2d
from components.errors import DataError
from components.models.store import build_denoiser, load_denoiser, save_denoiser
from components.preferences.bradley_terry import train_reward_model
from components.preferences.pairs import (PairSet, collect_pairs, pair_by_rank, read_labelled_pairs,
                                          read_pair_shards, write_pair_shards)
from components.preferences.rewards import RewardError, make_reward

SPEC = {"network": {"kind": "mlp", "kwargs": {"data_dim": 2, "width": 16, "depth": 1, "embed_dim": 8}},
        "schedule": {"name": "flow", "kwargs": {}}, "prediction": "v", "sigma_data": 1.0, "data_shape": [2],
        "num_classes": None, "kind": "points", "objective": "flow",
        "sampler": {"method": "euler", "grid": "uniform", "steps": 4, "guidance": 1.0}}


@pytest.mark.parametrize("square", [0, 3, 5, 6])
def test_region_reward_is_zero_exactly_on_the_named_checkerboard_square(square):
    x, labels, _ = make_toy2d("checkerboard", 2000, seed=0)
    scores = make_reward({"kind": "region", "squares": [square]})(torch.from_numpy(x), None)
    inside = torch.from_numpy(labels == square)
    assert inside.any() and bool((scores[inside] == 0).all())
    # other filled squares touch this one at most at a corner: strictly negative away from it
    assert float(scores[~inside].max()) <= 0 and float((scores[~inside] < 0).float().mean()) > 0.99


def test_region_reward_is_minus_the_distance_to_the_nearest_box():
    reward = make_reward({"kind": "region", "boxes": [[0, 0, 1, 1], [3, 0, 4, 1]]})
    x = torch.tensor([[0.5, 0.5], [2.0, 0.5], [1.0, 2.0], [-3.0, -4.0], [5.0, 1.0]])
    torch.testing.assert_close(reward(x, None), torch.tensor([0.0, -1.0, -1.0, -5.0, -1.0], dtype=torch.float64))


def test_user_function_reward_is_imported_and_shape_checked(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def right(x, cond):\n    return x[:, 0]\n\ndef wrong(x, cond):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.randn(5, 2)
    torch.testing.assert_close(make_reward({"kind": "function", "function": "my_rewards:right"})(x, None),
                               x[:, 0].double())
    with pytest.raises(RewardError, match=r"returned shape \(5, 2\); expected \[5\]"):
        make_reward({"kind": "function", "function": "my_rewards:wrong"})(x, None)
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        make_reward({"kind": "function", "function": "no_such_module:f"})
    with pytest.raises(RewardError, match="has no function 'missing'"):
        make_reward({"kind": "function", "function": "my_rewards:missing"})


def test_unknown_reward_kind_names_the_choices():
    with pytest.raises(RewardError, match="reward.kind 'pickscore' is unknown"):
        make_reward({"kind": "pickscore"})


def test_pairs_by_rank_drop_ties_and_small_margins():
    w, l = pair_by_rank(torch.tensor([0.0, 5.0, 1.0, 5.0]), min_margin=0.5)
    assert sorted(zip(w.tolist(), l.tolist())) == [(1, 2), (3, 0)]  # 5 vs 1 and 5 vs 0
    w, _ = pair_by_rank(torch.ones(10), min_margin=0.0)
    assert len(w) == 0


def _tiny_model(tmp_path):
    torch.manual_seed(0)
    save_denoiser(tmp_path / "m", build_denoiser(SPEC).state_dict(), SPEC)
    return load_denoiser(tmp_path / "m")


def test_collected_pairs_respect_the_margin_record_seeds_and_round_trip_through_shards(tmp_path):
    model = _tiny_model(tmp_path)
    reward = make_reward({"kind": "region", "boxes": [[0, 0, 5, 5]]})
    pairs = collect_pairs(model, reward, groups=3, k=40, min_margin=0.1, seed=2)
    assert 0 < len(pairs) <= 60
    assert bool(((pairs.score_w - pairs.score_l) >= 0.1).all())
    torch.testing.assert_close(reward(pairs.x_w, None), pairs.score_w)
    # a recorded seed regenerates its sample
    from components.preferences.pairs import seeded_noise
    again = model.sample(seeded_noise(pairs.seed_w[:3], [2])).x
    torch.testing.assert_close(again, pairs.x_w[:3])
    out = tmp_path / "pairs"
    out.mkdir()
    write_pair_shards(pairs, out, pairs_per_shard=7, pairs_per_record=3, info={"reward": "box"})
    back, manifest = read_pair_shards(out)
    assert manifest["count"] == len(pairs) and manifest["reward"] == "box" and len(manifest["shards"]) > 1
    for name in ("x_w", "x_l", "score_w", "score_l", "seed_w", "seed_l"):
        torch.testing.assert_close(getattr(back, name), getattr(pairs, name))


def test_a_reward_with_equal_scores_only_gives_no_pairs(tmp_path):
    model = _tiny_model(tmp_path)
    with pytest.raises(DataError, match="no pair reaches preferences.min_margin"):
        collect_pairs(model, lambda x, c: torch.zeros(len(x)), groups=2, k=8, min_margin=0.0, seed=0)


def test_labelled_jsonl_pairs_load_and_wrong_shapes_are_rejected(tmp_path):
    np.save(tmp_path / "a.npy", np.array([1.0, 2.0], dtype=np.float32))
    good = tmp_path / "pairs.jsonl"
    good.write_text(json.dumps({"winner": "a.npy", "loser": [0.0, 0.5]}) + "\n\n"
                    + json.dumps({"winner": [3, 4], "loser": [5, 6]}) + "\n")
    pairs = read_labelled_pairs(good, [2])
    assert len(pairs) == 2 and pairs.x_w[0].tolist() == [1.0, 2.0] and bool(torch.isnan(pairs.score_w).all())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"winner": [1, 2, 3], "loser": [0, 0, 0]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: winner has shape \[3\], but the model's data shape is \[2\]"):
        read_labelled_pairs(bad, [2])


def test_bradley_terry_model_recovers_the_ranking_of_a_hidden_reward(tmp_path):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1200, 2, generator=g), torch.randn(1200, 2, generator=g)
    hidden = lambda x: 2 * x[:, 0] - x[:, 1]  # noqa: E731
    first_wins = (hidden(a) > hidden(b))[:, None]
    x_w, x_l = torch.where(first_wins, a, b), torch.where(first_wins, b, a)
    torch.set_num_threads(1)  # a tiny MLP: threads only add sync cost on shared cores
    model = train_reward_model(x_w[:1000], x_l[:1000], tmp_path / "ckpt", steps=100, batch_size=200, seed=0)
    agree = (model.reward(x_w[1000:]) > model.reward(x_l[1000:])).float().mean()
    assert float(agree) > 0.9  # held-out pairs ranked like the hidden reward
