import pytest
import torch

from flashmoe_pack.engine.sampler import SamplingParams, sample


def _logits(seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 3


def test_greedy_is_argmax():
    for seed in range(5):
        x = _logits(seed)
        assert sample(x, temperature=0.0, top_p=0.9, top_k=50) == int(x.argmax())


def test_top_k_one_is_argmax():
    x = _logits(1)
    g = torch.Generator().manual_seed(0)
    assert all(sample(x, 1.0, 1.0, 1, g) == int(x.argmax()) for _ in range(20))


def test_tiny_top_p_keeps_only_the_best():
    x = _logits(2)
    g = torch.Generator().manual_seed(0)
    assert all(sample(x, 1.5, top_p=1e-6, top_k=0, generator=g) == int(x.argmax()) for _ in range(50))


def test_same_seed_same_tokens():
    x = _logits(3)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    g1, g2 = p.generator(), p.generator()
    a = [sample(x, p.temperature, p.top_p, p.top_k, g1) for _ in range(64)]
    b = [sample(x, p.temperature, p.top_p, p.top_k, g2) for _ in range(64)]
    assert a == b
    assert len(set(a)) > 1  # it really sampled


def test_draws_stay_in_top_k_and_cover_it():
    x = _logits(4)
    k = 8
    top = set(torch.topk(x, k).indices.tolist())
    g = torch.Generator().manual_seed(7)
    # Flat temperature so every one of the k candidates has a fair chance to show up.
    draws = [sample(x, 20.0, 1.0, k, g) for _ in range(400)]
    assert set(draws) <= top
    assert set(draws) == top


def test_top_p_cut_is_the_smallest_prefix():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 needs the first two tokens, never the others
    x = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    g = torch.Generator().manual_seed(0)
    draws = {sample(x, 1.0, 0.7, 0, g) for _ in range(300)}
    assert draws == {1, 3}


def test_frequencies_follow_probabilities():
    x = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample(x, 1.0, 1.0, 0, g) for _ in range(2000)])
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.05)


def test_params_validation():
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(top_k=-1)
    assert SamplingParams(temperature=0).greedy
