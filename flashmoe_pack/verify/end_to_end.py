"""End-to-end verification: the packed model's logits against a reference on prompts.

The reference is transformers' modeling code for models that fit in RAM, and otherwise the
runtime itself run on the unquantized source weights, every expert read lazily from the original
safetensors (works for any size: memory stays near the resident weights).
The runtime's agreement with transformers is itself checked by tests/test_runtime.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import get_model_class
from ..pack import format as fmt
from ..sources.checkpoint import Checkpoint

PROMPTS = (
    "The capital of France is",
    'Return JSON only: {"name": "Ada", "tools": ["search", "calc"], "ok": true}',
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1905 Albert Einstein published four papers that",
    "Translate to German: The weather is nice today.",
    "<tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n</function>\n</tool_call>",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a small village by the sea,",
)
# Bounds per bit width on the mean KL(ref || packed) per token and on top-1 agreement.
KL_LIMITS = {16: 1e-3, 8: 0.02, 4: 0.15, 2: 0.8}
TOP1_LIMITS = {16: 0.99, 8: 0.9, 4: 0.7, 2: 0.4}


class SourceExperts:
    """Routed experts read on demand from the source checkpoint (float32), cached per layer."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32):
        self.ckpt, self.dtype = ckpt, dtype
        self._layer, self._cache = -1, {}

    def _get(self, layer: int, e: int):
        if layer != self._layer:  # keep one layer's experts at most: memory stays bounded
            self._layer, self._cache = layer, {}
        if e not in self._cache:
            self._cache[e] = tuple(self.ckpt.expert_matrix(layer, e, p).to(self.dtype) for p in fmt.PROJS)
        return self._cache[e]

    def forward(self, layer, x, ids, weights):
        out = torch.zeros_like(x)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            gate, up, down = self._get(layer, e)
            xe = x[tok].to(self.dtype)
            y = torch.nn.functional.linear(torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T), down)
            out.index_add_(0, tok, (y * weights[tok, slot, None].to(self.dtype)).to(out.dtype))
        return out


def choose_engine(src: str) -> str:
    """"transformers" when it is installed and the fp32 model fits easily in RAM, else "runtime"."""
    import importlib.util
    import os

    if importlib.util.find_spec("transformers") is None:
        return "runtime"
    src_bytes = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return "transformers" if src_bytes * 4 < ram // 4 else "runtime"  # x2 for bf16 -> fp32, with room


def reference_logits_fn(src: str, engine: str = "auto", experts_per_token: int | None = None):
    """A function ids -> float32 logits [T, V] computed from the unquantized source.
    engine: "runtime", "transformers" or "auto" (see choose_engine)."""
    ckpt = Checkpoint(src)
    if engine == "auto":
        engine = choose_engine(src)
    if engine == "transformers":
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(src)
        if experts_per_token:  # the packed model may run with a smaller K: compare like with like
            cfg.get_text_config().num_experts_per_tok = experts_per_token
        hf = AutoModelForCausalLM.from_pretrained(src, config=cfg, dtype=torch.float32, attn_implementation="eager")
        if hasattr(hf, "set_experts_implementation"):
            hf.set_experts_implementation("eager")  # the grouped-mm path needs 16-byte-aligned sizes
        hf.eval()
        return torch.no_grad()(lambda ids: hf(torch.as_tensor(ids)[None]).logits[0].float())
    if engine != "runtime":
        raise ValueError(f"reference engine must be 'auto', 'runtime' or 'transformers', got {engine!r}")
    cls = get_model_class(ckpt.model_type)
    overrides = {"num_experts_per_tok": experts_per_token} if experts_per_token else {}
    cfg = cls.config_class.from_dict(ckpt.config, **overrides)
    weights = {n: t.float() for n, t in ckpt.resident_tensors()}
    model = cls(cfg, weights, SourceExperts(ckpt))
    return lambda ids: model.forward(torch.as_tensor(ids, dtype=torch.long), model.new_state())


@dataclass
class PromptResult:
    tokens: int
    kl: float  # mean over positions of KL(ref || packed), nats
    top1: float  # fraction of positions where the argmax agrees
    max_abs: float  # max |logit difference|
    max_rel: float  # max_abs / max |ref logit|


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> PromptResult:
    lp_ref, lp_got = torch.log_softmax(ref.float(), -1), torch.log_softmax(got.float(), -1)
    kl = (lp_ref.exp() * (lp_ref - lp_got)).sum(-1).mean().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    diff = (ref - got).abs().max().item()
    return PromptResult(ref.shape[0], kl, top1, diff, diff / max(ref.abs().max().item(), 1e-30))


def prompt_ids(model, n: int, seed: int = 0) -> list[list[int]]:
    """n prompts as token ids: the built-in texts through the model's tokenizer, else random ids."""
    if model.tokenizer is not None:
        return [model.tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (16 + 7 * i,), generator=gen).tolist() for i in range(n)]


def verify_end_to_end(model, src: str, n_prompts: int = 4, engine: str = "auto") -> list[PromptResult]:
    """Compare `model` (a loaded packed model) with the reference on n prompts."""
    ref_fn = reference_logits_fn(src, engine, model.config.num_experts_per_tok)
    return [compare_logits(ref_fn(ids), model.logits(ids)) for ids in prompt_ids(model, n_prompts)]


def e2e_failures(results: list[PromptResult], bits: int) -> list[str]:
    kl = sum(r.kl for r in results) / len(results)
    top1 = sum(r.top1 * r.tokens for r in results) / sum(r.tokens for r in results)
    out = []
    if kl > KL_LIMITS[bits]:
        out.append(f"mean KL {kl:.4g} > {KL_LIMITS[bits]} for {bits}-bit")
    if top1 < TOP1_LIMITS[bits]:
        out.append(f"top-1 agreement {top1:.3f} < {TOP1_LIMITS[bits]} for {bits}-bit")
    return out


def format_e2e(results: list[PromptResult]) -> str:
    rows = [f"{'prompt':>6} {'tokens':>6} {'KL':>10} {'top-1':>6} {'max |dlogit|':>12} {'rel':>9}"]
    for i, r in enumerate(results):
        rows.append(f"{i:>6} {r.tokens:>6} {r.kl:>10.3g} {r.top1:>6.3f} {r.max_abs:>12.4g} {r.max_rel:>9.3g}")
    return "\n".join(rows)
