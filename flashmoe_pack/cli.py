"""The flashmoe-pack command line: download | quantize | verify | run | inspect.

Each command is a thin wrapper over the library; errors the user can fix print one clear line
and exit with status 1 (2 for bad usage), never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from flashmoe_pack.commands import RESIDENT_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Pack, verify and run Mixture-of-Experts models that do not fit in memory.")


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors():
    """Turn the errors a user can act on into one line and a non-zero exit."""
    from .hub import HubError
    from .pack.format import FormatError
    from .sources.checkpoint import SourceError

    try:
        yield
    except typer.Exit:  # click's Exit is a RuntimeError: let it through untouched
        raise
    except (FormatError, SourceError, HubError, ValueError, FileExistsError, FileNotFoundError,
            KeyError, RuntimeError) as e:
        _fail(str(e).strip("'\""))


def _stream_quantize(repo_id: str, revision: str | None, out: Path, scratch: Path | None, **qkw) -> Path:
    """Fetch one shard, pack it, delete it, go on: scratch disk stays near two shards."""
    from . import hub
    from .pack import done_shards, quantize

    p = hub.plan(repo_id, revision)
    typer.echo(f"{repo_id}@{p.commit[:12]}: {len(p.shards)} shards, {hub.human_bytes(p.total_bytes)} "
               f"to stream through {scratch or out.with_name(out.name + '.scratch')}")
    scratch = scratch or out.with_name(out.name + ".scratch")
    it = hub.stream_shards(repo_id, revision, scratch, repo_plan=p, skip=done_shards(out))
    meta_dir = next(it)
    shards = ((path.name, path) for path in it)
    result = quantize(meta_dir, out, source_info={"repo": repo_id, "revision": p.commit}, shards=shards,
                      shard_names=p.shards, **qkw)
    import shutil

    shutil.rmtree(scratch, ignore_errors=True)
    return result


def _workers(n: int | None) -> int:
    from .pack import default_workers

    if n is not None and n < 1:
        _fail(f"--workers must be at least 1, got {n}", 2)
    return default_workers() if n is None else n


@app.command()
def download(
    repo_id: str = typer.Argument("Qwen/Qwen3.5-397B-A17B", help="Hugging Face repo id."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit."),
    dir: Path | None = typer.Option(None, "--dir", help="Where to put the files (default: ./<repo name>)."),
    quantize_: bool = typer.Option(False, "--quantize", help="Stream: download, pack and delete shard by shard."),
    out: Path | None = typer.Option(None, "--out", help="Packed output folder (with --quantize)."),
    bits: int = typer.Option(4, help="Expert bits with --quantize: 2, 4, 8 or 16."),
    group_size: int = typer.Option(64, help="Quantization group size with --quantize."),
    workers: int | None = typer.Option(None, help="Processes quantizing experts with --quantize (default: one "
                                                  "per CPU core)."),
):
    """Download what packing needs (safetensors, index, configs, tokenizer); resumable."""
    from . import hub

    with _user_errors():
        if quantize_:
            target = out or Path(repo_id.split("/")[-1] + f"-{bits}bit")
            path = _stream_quantize(repo_id, revision, target, dir, bits=bits, group_size=group_size,
                                    workers=_workers(workers))
            typer.echo(f"packed model written to {path}")
            return
        path = hub.download(repo_id, revision, dir or Path(repo_id.split("/")[-1]))
        typer.echo(f"downloaded to {path}")


@app.command()
def quantize(
    src: str = typer.Argument(..., help="Source checkpoint folder (or a repo id with --from-hub)."),
    out: Path = typer.Argument(..., help="Packed output folder."),
    bits: int = typer.Option(4, help="Expert bits: 4 or 2 (8 also works; 16 stores experts unquantized)."),
    group_size: int = typer.Option(64, help="Columns per scale/bias group."),
    scale_dtype: str = typer.Option("bfloat16", help="Stored dtype of scales and biases: bfloat16 | float16."),
    resident_dtype: str = typer.Option("auto", help="Non-expert weights: auto (bf16; the source dtype at 16 "
                                                    "bits) | bfloat16 | float16 | float32 | q8 (8-bit groups of 64, "
                                                    "dequantized at load: halves the file)."),
    method: str = typer.Option("mse", help="mse (error-minimising scale/bias) or minmax."),
    from_hub: bool = typer.Option(False, "--from-hub", help="SRC is a repo id: stream shards from the hub."),
    revision: str | None = typer.Option(None, help="Revision with --from-hub."),
    scratch: Path | None = typer.Option(None, help="Scratch folder for streamed shards."),
    workers: int | None = typer.Option(None, help="Processes quantizing expert matrices in parallel (default: one "
                                                  "per CPU core); the output is the same for any number."),
):
    """Quantize the experts and repack into page-aligned per-layer expert files with an index."""
    from .pack import quantize as do_quantize

    kw = dict(bits=bits, group_size=group_size, scale_dtype=scale_dtype, resident_dtype=resident_dtype,
              method=method, workers=_workers(workers))
    with _user_errors():
        if from_hub:
            path = _stream_quantize(src, revision, out, scratch, **kw)
        else:
            if not Path(src).is_dir():
                _fail(f"{src}: not a folder (to fetch from the hub, add --from-hub)")
            path = do_quantize(src, out, **kw)
    typer.echo(f"packed model written to {path}")


@app.command()
def verify(
    packed: Path = typer.Argument(..., help="Packed model folder."),
    reference: Path | None = typer.Option(None, help="Source checkpoint to compare against."),
    fast: int | None = typer.Option(None, help="Check N sampled records per layer instead of all."),
    prompts: int = typer.Option(0, help="End-to-end: compare logits on N prompts (needs --reference)."),
    reference_engine: str = typer.Option("auto", help="auto (transformers if the model fits in RAM) | "
                                                      "transformers | runtime (source weights streamed)."),
):
    """Check structure and checksums; with --reference, numerics and (with --prompts) logits."""
    from .verify import format_table, verify_numerics, verify_structure

    with _user_errors():
        rep = verify_structure(packed, fast=fast)
        for p in rep.problems:
            typer.secho(f"FAIL {p}", fg=typer.colors.RED)
        typer.echo(f"structure: {rep.records_checked} expert records and {rep.resident_checked} resident tensors "
                   f"checked, {len(rep.problems)} problems")
        if not rep.ok:
            raise typer.Exit(1)
        failed = False
        if reference is not None:
            from .pack import load_index
            from .sources.checkpoint import Checkpoint

            index = load_index(packed)
            res = verify_numerics(index, Checkpoint(reference), sample=fast)
            typer.echo(format_table(res, index.bits))
            for r in res:
                for f in r.failures[:5]:
                    typer.secho(f"FAIL layer {r.layer}: {f}", fg=typer.colors.RED)
                failed |= bool(r.failures)
            if prompts:
                failed |= _verify_e2e(packed, reference, prompts, reference_engine, index.bits)
        elif prompts:
            _fail("--prompts needs --reference SRC", 2)
        if failed:
            raise typer.Exit(1)
        typer.secho("verify: OK", fg=typer.colors.GREEN)


def _verify_e2e(packed: Path, reference: Path, prompts: int, engine: str, bits: int) -> bool:
    from . import load
    from .verify import e2e_failures, format_e2e, verify_end_to_end
    from .verify.end_to_end import choose_engine

    engine = choose_engine(str(reference)) if engine == "auto" else engine
    typer.echo(f"end to end: packed model vs {engine} on the unquantized source, {prompts} prompts")
    m = load(packed, dtype="float32")
    res = verify_end_to_end(m, str(reference), prompts, engine)
    typer.echo(format_e2e(res))
    fails = e2e_failures(res, bits)
    for f in fails:
        typer.secho(f"FAIL end-to-end: {f}", fg=typer.colors.RED)
    return bool(fails)


HOST_CACHE_HELP = ("Byte budget of the runtime's expert cache in RAM, e.g. 8GiB or 0, or 'auto' (default: "
                   "available memory - resident weights - max(2 GiB, 15%), at most 1 GiB with --io os; on cuda "
                   "the host tier under the VRAM one).")
IO_HELP = ("auto (default: direct where the filesystem accepts O_DIRECT, on Linux; else os) | os (page cache) | "
           "direct (O_DIRECT / F_NOCACHE, own cache only).")
GPU_CACHE_HELP = "cuda: byte budget of the VRAM expert tier ('auto': free device memory less a reserve)."


CPU_DOT_HELP = ("CPU decode arithmetic: auto (int8 activations where the CPU has AVX-512 VNNI, else f32) | f32 "
                "(the float path, exact up to float32 rounding) | int8. Process-wide; the library's default is f32.")


def set_cpu_dot(choice: str, device: str) -> None:
    """--cpu-dot: the C kernels' decode arithmetic (README: speed and accuracy). auto leaves an explicit
    FLASHMOE_CPU_DOT alone."""
    if choice not in ("auto", "f32", "int8"):
        _fail(f"--cpu-dot {choice!r}: use auto, f32 or int8", 2)
    if device != "cpu" or choice == "auto" and os.environ.get("FLASHMOE_CPU_DOT"):
        return
    from .backends import cpu

    if not cpu.available():
        if choice == "int8":
            _fail(f"--cpu-dot int8: the C kernels are unavailable ({cpu.unavailable_reason()})", 2)
        return
    has_int8 = "int8" in cpu.supported_dots()
    if choice == "int8" and not has_int8:
        _fail("--cpu-dot int8: this CPU lacks AVX-512 VNNI; use auto or f32", 2)
    cpu.set_dot("int8" if choice == "auto" and has_int8 else "f32" if choice == "auto" else choice)


def host_cache(value: str | None, device: str) -> str:
    """--expert-cache / --host-expert-cache with its device-dependent default."""
    if value is not None:
        return value
    return "auto"


@app.command()
def run(
    model: Path | None = typer.Argument(None, help="Packed model folder (default: the built-in tiny model)."),
    prompt: str = typer.Option("Hello", help="Prompt text."),
    tokens: int = typer.Option(64, help="Maximum new tokens."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0, help="0 = no top-k cut."),
    seed: int | None = typer.Option(None),
    experts_per_token: int | None = typer.Option(None, "--experts-per-token", "-k",
                                                    help="Experts per token (default: the model's own). "
                                                         "Fewer is faster but costs quality."),
    expert_cache: str | None = typer.Option(None, "--expert-cache", "--host-expert-cache", help=HOST_CACHE_HELP),
    gpu_expert_cache: str = typer.Option("auto", help=GPU_CACHE_HELP),
    io: str = typer.Option("auto", help=IO_HELP),
    threads: int = typer.Option(8, help="Parallel expert reads."),
    device: str = typer.Option("cpu", help="cpu | cuda | mps."),
    timing: bool = typer.Option(False, help="Print a per-layer time breakdown and totals."),
    verify_reads: bool = typer.Option(True, help="Check every expert record read against its xxhash64."),
    resident: str = typer.Option("auto", help=RESIDENT_HELP),
    cpu_dot: str = typer.Option("auto", help=CPU_DOT_HELP),
):
    """Generate text, streaming experts from disk."""
    from . import load
    from .engine.profiler import Profiler
    from .engine.sampler import SamplingParams

    with _user_errors():
        if tokens < 1:
            _fail("--tokens must be at least 1", 2)
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        set_cpu_dot(cpu_dot, device)
        m = load(model, device=device, expert_cache=host_cache(expert_cache, device), io=io, threads=threads,
                 experts_per_token=experts_per_token, gpu_expert_cache=gpu_expert_cache, verify_reads=verify_reads,
                 resident=resident)
        prof = Profiler(sync=_sync_fn(device)) if timing else None
        for text in m.generate(prompt, chat=chat, max_tokens=tokens, sampling=sampling, profiler=prof):
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if timing:
            from .engine.report import timing_report

            typer.echo(timing_report(m, prof), err=True)
            if hasattr(m.store, "describe"):  # cpu: io mode, cache budget and how it was chosen
                typer.echo(m.store.describe(), err=True)
            if hasattr(m.store, "tier_report"):  # cuda: VRAM / host / disk tiers
                typer.echo(m.store.tier_report(), err=True)


def _sync_fn(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


@app.command()
def inspect(model: Path = typer.Argument(..., help="Packed model folder.")):
    """Print what a packed model holds: geometry, quantization, sizes."""
    from .pack import load_index

    with _user_errors():
        ix = load_index(model)
        r = ix.raw
        ex = r["experts"]
        total = sum(e["file_bytes"] for e in ex["layers"])
        summary = {"model_type": r["model_type"], "layers": len(ex["layers"]), "experts": ex["num_experts"],
                   "experts_per_token": r["config"].get("num_experts_per_tok"), "quantization": r["quantization"],
                   "expert_record_bytes": ex["record_bytes"], "stride": ex["stride"],
                   "expert_bytes_total": total, "resident_tensors": len(r["resident"]["tensors"]),
                   "source": r["source"]}
        typer.echo(json.dumps(summary, indent=2))


# Commands that live in their own modules (chat, serve, bench, ...) register themselves here.
from .commands import register_all  # noqa: E402

register_all(app)


def main():  # pragma: no cover
    app()
