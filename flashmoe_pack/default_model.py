"""The built-in tiny default model: a deterministic Qwen3.5-MoE source checkpoint, packed on first use.

`make_source(dir)` writes a complete Hugging Face style checkpoint (config,
generation config, tokenizer, chat template, bf16 safetensors with the hub's
tensor names) from fixed seeds, byte for byte the same on every call.
`default_model_dir()` packs it once into the user cache dir.
transformers is not needed for any of this.
"""

from __future__ import annotations

import fcntl
import heapq
import json
import os
import shutil
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

SEED = 20250601
VERSION = "default-v1"  # bump when make_source's output changes, so old caches are not reused

# Special tokens in Qwen's order; the think/tool tags are not "special" (Qwen marks them so),
# so they survive decode(skip_special_tokens=True) and can be parsed from the output.
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# 256 byte symbols + merges + 13 added tokens = 768 ids, a multiple of 64.
NUM_MERGES = 768 - 256 - len(SPECIAL) - len(TAGS)
# Qwen2's pre-tokenizer pattern: words, single digits, punctuation runs, newlines, spaces.
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = """\
The model reads only the experts that the router picks for each token, so the disk does most of the work.
A small dense part stays in memory: the embeddings, the attention layers, the router and the output head.
When the cache holds the experts that were used for the last few tokens, the next token is often faster.
You are a helpful assistant. Answer the question of the user in a short and clear way.
What is the weather like today? It is sunny in the morning and it will rain in the afternoon.
Please write a function that returns the sum of two numbers, and explain how it works.
def add(a, b):
    return a + b
The user asked for a list of the planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {}}}
There are 24 hours in a day, 7 days in a week and 365 days in a year, or 366 in a leap year.
I think the answer is correct, but let me check it again before I write the final answer.
First, we need to understand the question. Then we can find the answer step by step.
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
Thank you for your help! You're welcome. Let me know if there is anything else I can do for you.
In the beginning the river was small, but it grew as it went down the valley towards the sea.
She said that the book was on the table in the kitchen, next to the cup of coffee and the keys.
Our results show that the new method is faster than the old one and uses less memory as well.
The function takes a string and a number as input and returns a new string with the text repeated.
Water boils at 100 degrees Celsius at sea level, and it freezes at 0 degrees.
Can you tell me how to get to the station? Go straight on, then turn left at the second street.
This is a test of the tokenizer: numbers like 3.14 and 2025, symbols like (), [], {} and <> too.
He opened the window because the room was too warm, and a cool wind came in from the garden.
The children were playing in the park while their parents talked about the weather and the news.
Every layer of the network has its own experts, and every expert is a small feed forward block.
Café, naïve, résumé: some words have accents. 東京 and 北京 are cities. Emoji: 🙂 👍.
"""

CHAT_TEMPLATE = r"""{%- macro text(c) -%}
{%- if c is string -%}{{ c }}{%- else -%}{%- for p in c if p.type == 'text' -%}{{ p.text }}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages and messages[0].role == 'system' %}{{- text(messages[0].content) + '\n\n' }}{%- endif %}
{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
{{- '\n</tools>\n\nTo call a function, reply in this format:\n<tool_call>\n<function=example_function_name>\n' }}
{{- '<parameter=example_parameter>\nvalue\n</parameter>\n</function>\n</tool_call><|im_end|>\n' }}
{%- elif messages and messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + text(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}
{%- for m in messages %}
{%- if m.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('The system message must be the first message.') }}{%- endif %}
{%- elif m.role == 'user' %}
{{- '<|im_start|>user\n' + text(m.content) + '<|im_end|>\n' }}
{%- elif m.role == 'assistant' %}
{%- set content = text(m.content) if m.content is defined else '' %}
{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}
{%- if '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
{%- set content = content.split('</think>')[-1].lstrip('\n') %}
{%- endif %}
{{- '<|im_start|>assistant\n' }}
{%- if loop.index0 > ns.last_query %}{{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' }}{%- endif %}
{{- content }}
{%- for tc in m.tool_calls or [] %}
{%- set f = tc.function if tc.function is defined else tc %}
{%- if not loop.first or content %}{{- '\n\n' if loop.first else '\n' }}{%- endif %}
{%- if f.arguments is not mapping %}{{- raise_exception('tool call arguments must be a mapping') }}{%- endif %}
{{- '<tool_call>\n<function=' + f.name + '>\n' }}
{%- for k, v in f.arguments.items() %}
{{- '<parameter=' + k + '>\n' + (v if v is string else v | tojson) + '\n</parameter>\n' }}
{%- endfor %}
{{- '</function>\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\n' }}
{%- elif m.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + text(m.content) + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- else %}
{{- raise_exception('Unknown role: ' + m.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}
{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}
"""


def _learn_merges(words: Counter, n: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair).

    Written out instead of tokenizers' BpeTrainer so the result is fixed by this code alone,
    not by a library version's tie-breaking. Pair counts are updated incrementally and kept in a
    heap with lazy deletion, which makes it fast enough to run on every make_source call.
    """
    seqs = {w: tuple(w) for w in words}
    counts: Counter = Counter()
    where: dict[tuple[str, str], set[str]] = {}
    for w, s in seqs.items():
        for p in zip(s, s[1:]):
            counts[p] += words[w]
            where.setdefault(p, set()).add(w)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while len(merges) < n and heap:
        c, best = heapq.heappop(heap)
        if -c != counts[best] or c == 0:  # stale entry: the count changed after it was pushed
            continue
        merges.append(best)
        changed = set()
        for w in where.pop(best):
            s, f = seqs[w], words[w]
            for p in zip(s, s[1:]):
                counts[p] -= f
                changed.add(p)
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = s = tuple(out)
            for p in zip(s, s[1:]):
                counts[p] += f
                changed.add(p)
                where.setdefault(p, set()).add(w)
        del counts[best]
        for p in changed - {best}:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order (so id b is byte b)."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # printable as themselves
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def build_tokenizer() -> Tokenizer:
    """The default model's byte-level BPE tokenizer (Qwen-style pre-tokenizer), learned from CORPUS."""
    tok = Tokenizer(models.BPE())  # placeholder model: the pre-tokenizer is needed to learn merges
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    text = tok.normalizer.normalize_str(CORPUS)
    words = Counter(piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text))
    merges = _learn_merges(words, NUM_MERGES)
    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    for a, b in merges:  # two merge paths can spell the same string: it keeps its first id
        vocab.setdefault(a + b, len(vocab))
    tok.model = models.BPE(vocab=vocab, merges=merges)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


def _configs(tok: Tokenizer) -> tuple[dict, dict, dict]:
    """config.json, generation_config.json and tokenizer_config.json, in the real Qwen3.5 layout."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    text = {
        "model_type": "qwen3_5_moe_text",
        "vocab_size": tok.get_vocab_size(),
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "full_attention_interval": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "attn_output_gate": True,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 128,  # a multiple of the 64-wide quantization groups
        "shared_expert_intermediate_size": 128,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        # rotary dim = 32 * 0.25 = 8, i.e. 4 frequencies split 2/1/1 over the (t, h, w) sections
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "mamba_ssm_dtype": "float32",
        "mtp_num_hidden_layers": 0,  # the real model has one MTP layer; this one ships none
        "use_cache": True,
        "eos_token_id": ids["<|im_end|>"],
        "dtype": "bfloat16",
    }
    # A tiny vision tower keeps transformers from building the 27-layer default one; its weights are not
    # shipped (flashmoe-pack runs text only), so transformers reports them missing, which is expected.
    vision = {"model_type": "qwen3_5_moe_vision", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
              "num_heads": 2, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "out_hidden_size": 128, "num_position_embeddings": 64,
              "hidden_act": "gelu_pytorch_tanh", "initializer_range": 0.02}
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": vision,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }
    generation = {"do_sample": True, "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                  "pad_token_id": ids["<|endoftext|>"], "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    tok_config = {"tokenizer_class": "TokenizersBackend", "eos_token": "<|im_end|>",
                  "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "add_bos_token": False,
                  "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
                  "split_special_tokens": False}
    return config, generation, tok_config


def _shapes(c: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every text weight of the hub layout: name -> (shape, init kind)."""
    H, V, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    kd = c["linear_num_key_heads"] * c["linear_key_head_dim"]
    vd = c["linear_num_value_heads"] * c["linear_value_head_dim"]
    nv, I, Is = c["linear_num_value_heads"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    P = "model.language_model."
    out = {P + "embed_tokens.weight": ((V, H), "proj"), P + "norm.weight": ((H,), "norm"),
           "lm_head.weight": ((V, H), "proj")}
    for i, kind in enumerate(c["layer_types"]):
        L = f"{P}layers.{i}."
        w = {"input_layernorm.weight": ((H,), "norm"), "post_attention_layernorm.weight": ((H,), "norm")}
        if kind == "linear_attention":
            w |= {"linear_attn.in_proj_qkv.weight": ((2 * kd + vd, H), "proj"),
                  "linear_attn.in_proj_z.weight": ((vd, H), "proj"),
                  "linear_attn.in_proj_b.weight": ((nv, H), "proj"),
                  "linear_attn.in_proj_a.weight": ((nv, H), "proj"),
                  "linear_attn.conv1d.weight": ((2 * kd + vd, 1, c["linear_conv_kernel_dim"]), "conv"),
                  "linear_attn.dt_bias": ((nv,), "ones"),
                  "linear_attn.A_log": ((nv,), "A_log"),
                  "linear_attn.norm.weight": ((c["linear_value_head_dim"],), "gated_norm"),
                  "linear_attn.out_proj.weight": ((H, vd), "proj")}
        else:
            nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
            w |= {"self_attn.q_proj.weight": ((nh * hd * 2, H), "proj"),  # query and its output gate
                  "self_attn.k_proj.weight": ((nkv * hd, H), "proj"),
                  "self_attn.v_proj.weight": ((nkv * hd, H), "proj"),
                  "self_attn.o_proj.weight": ((H, nh * hd), "proj"),
                  "self_attn.q_norm.weight": ((hd,), "norm"),
                  "self_attn.k_norm.weight": ((hd,), "norm")}
        w["mlp.gate.weight"] = ((c["num_experts"], H), "router")
        for e in range(c["num_experts"]):
            w |= {f"mlp.experts.{e}.gate_proj.weight": ((I, H), "proj"),
                  f"mlp.experts.{e}.up_proj.weight": ((I, H), "proj"),
                  f"mlp.experts.{e}.down_proj.weight": ((H, I), "proj")}
        w |= {"mlp.shared_expert.gate_proj.weight": ((Is, H), "proj"),
              "mlp.shared_expert.up_proj.weight": ((Is, H), "proj"),
              "mlp.shared_expert.down_proj.weight": ((H, Is), "proj"),
              "mlp.shared_expert_gate.weight": ((1, H), "proj")}
        out |= {L + k: v for k, v in w.items()}
    return out


def _init(name: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    # One generator per tensor, seeded from its name: adding a tensor never changes the others.
    g = torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))
    if kind == "A_log":  # decay rates A in [1, 16], as the model stores them: log(A)
        return torch.empty(shape).uniform_(1.0, 16.0, generator=g).log_().to(torch.bfloat16)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.bfloat16)
    std = {"proj": 0.02, "router": 0.2, "conv": 0.25, "norm": 0.1, "gated_norm": 0.1}[kind]
    # Router weights 10x larger than the rest so top-k routing is decisive, not a near tie that
    # quantization noise would flip. Norm weights get small noise around the identity (0 for the
    # (1 + w) RMSNorms, 1 for the gated norm) so a runtime that drops them is caught.
    x = torch.randn(shape, generator=g) * std
    return (x + 1.0 if kind == "gated_norm" else x).to(torch.bfloat16)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_source(dir: str | Path) -> Path:
    """Write the tiny default Qwen3.5-MoE checkpoint into `dir` (created if needed) and return it.

    Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    chat_template.jinja and model.safetensors (bf16, hub tensor names, per-expert tensors).
    The output is byte-identical on every call.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    config, generation, tok_config = _configs(tok)
    tensors = {n: _init(n, s, k) for n, (s, k) in _shapes(config["text_config"]).items()}
    save_file(tensors, str(dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(dir / "config.json", config)
    _write_json(dir / "generation_config.json", generation)
    _write_json(dir / "tokenizer_config.json", tok_config)
    (dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    (dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return dir


def cache_root() -> Path:
    """$FLASHMOE_PACK_CACHE, else $XDG_CACHE_HOME/flashmoe-pack, else ~/.cache/flashmoe-pack."""
    if os.environ.get("FLASHMOE_PACK_CACHE"):
        return Path(os.environ["FLASHMOE_PACK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "flashmoe-pack"


def default_model_dir() -> Path:
    """The packed default model (4-bit, groups of 64), built into the cache on first use.

    The build runs under an exclusive file lock, in a temporary sibling directory that is
    renamed into place only once quantize has finished: a concurrent caller waits and then
    reuses the result, and an interrupted build leaves only a temp dir that the next build removes.
    """
    root = cache_root()
    final = root / VERSION
    if final.is_dir():  # the rename below is atomic, so an existing dir is a complete one
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if final.is_dir():  # built by another process while we waited
            return final
        for stale in root.glob(f".{VERSION}.tmp-*"):  # left by a killed build; no one else holds the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}.tmp-", dir=root))
        try:
            from flashmoe_pack.pack import quantize  # imported late: the tokenizer and source need no packer

            quantize(make_source(tmp / "source"), tmp / "packed", bits=4, group_size=64)
            os.rename(tmp / "packed", final)
            fd = os.open(root, os.O_RDONLY)  # make the rename itself durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
