"""Next-token sampling: a small pure function plus the options it takes.

`sample` filters with top-k, then top-p (nucleus), then draws with a
torch.Generator, so one seed gives one sequence. The draw itself always runs on
the CPU over the few surviving candidates: the same seed then gives the same
tokens whether the logits came from the CPU, CUDA or MPS backend, and only the
survivors cross to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax). top_k: keep the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = no limit).
    seed: seeds the generator returned by `generator()`; None draws a fresh random seed.
    """

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 20
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0 or self.top_k == 1

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed` (or randomly), to pass to `sample` for one sequence."""
        g = torch.Generator(device="cpu")
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """Pick one token id from `logits` [V].

    temperature 0 (or top_k 1) is greedy argmax and draws nothing from the generator.
    Otherwise logits are divided by temperature, cut to the top_k best (0 = all),
    then to the smallest prefix whose probability mass reaches top_p (the best
    token always survives), and one token is drawn from the renormalized rest.
    `generator` must be a CPU generator (see SamplingParams.generator); None uses
    torch's global RNG.
    """
    if logits.dim() != 1:
        raise ValueError(f"sample expects logits of shape [V], got {tuple(logits.shape)}")
    if temperature == 0 or top_k == 1:
        return int(torch.argmax(logits))
    vocab = logits.shape[0]
    k = vocab if top_k <= 0 else min(top_k, vocab)
    scaled = logits.float() / temperature
    # topk(sorted=True) is both the top-k cut and the descending sort that the nucleus cut needs.
    vals, ids = torch.topk(scaled, k, sorted=True)  # [k], [k]
    probs = torch.softmax(vals, dim=-1)  # [k]
    if top_p < 1.0:
        # Keep token i while the mass before it is still below top_p: the smallest prefix reaching top_p.
        before = torch.cumsum(probs, dim=-1) - probs  # [k]
        n = max(int((before < top_p).sum()), 1)  # at least the best token, even with rounding
        probs, ids = probs[:n], ids[:n]
    probs, ids = probs.cpu(), ids.cpu()
    choice = torch.multinomial(probs, 1, generator=generator)  # renormalizes internally
    return int(ids[choice])
