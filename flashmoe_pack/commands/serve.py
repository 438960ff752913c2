"""`flashmoe-pack serve`: the OpenAI-compatible API (and Anthropic /v1/messages) over one packed model."""

from __future__ import annotations

from pathlib import Path

import typer

from flashmoe_pack.commands import RESIDENT_HELP


def serve(
    model: Path | None = typer.Argument(None, help="Packed model folder (default: the built-in tiny model)."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind (0.0.0.0 exposes the server to the network)."
    ),
    port: int = typer.Option(8000, help="TCP port."),
    max_queue: int = typer.Option(
        16,
        "--max-queue",
        help="Requests that may wait behind the running one; more get 503 with Retry-After.",
    ),
    max_context: int | None = typer.Option(
        None,
        "--max-context",
        help="Prompt + completion tokens (default: the model's max_position_embeddings).",
    ),
    name: str | None = typer.Option(None, "--name", help="Model id clients ask for (default: folder name)."),
    snapshots: int = typer.Option(8, help="Prompt-prefix state snapshots kept for reuse (0 disables reuse)."),
    snapshot_memory: str = typer.Option("2GiB", help="Byte budget of the prefix snapshots."),
    experts_per_token: int | None = typer.Option(
        None, "--experts-per-token", "-k", help="Experts per token (default: the model's own)."
    ),
    expert_cache: str | None = typer.Option(
        None, "--expert-cache", "--host-expert-cache",
        help="Byte budget of the runtime's expert cache in RAM, e.g. 8GiB or 0 (default 'auto': what memory "
             "leaves after the resident weights and a reserve; on cuda the host tier).",
    ),
    gpu_expert_cache: str = typer.Option("auto", help="cuda: byte budget of the VRAM expert tier."),
    io: str = typer.Option("auto", help="auto (direct where O_DIRECT works, Linux) | os (page cache) | direct."),
    threads: int = typer.Option(8, help="Parallel expert reads."),
    device: str = typer.Option("cpu", help="cpu | cuda | mps."),
    resident: str = typer.Option("auto", help=RESIDENT_HELP),
    cpu_dot: str = typer.Option("auto", help="CPU decode arithmetic: auto (int8 activations with AVX-512 VNNI, "
                                             "else f32) | f32 | int8."),
    compute_threads: int | None = typer.Option(
        None,
        help="torch CPU threads (default: torch's choice; 1 is faster for small models on a busy machine).",
    ),
    log_level: str = typer.Option("info", help="uvicorn log level: warning, info, debug."),
):
    """Serve the model over HTTP: /v1/chat/completions, /v1/completions, /v1/messages, /v1/models, /health."""
    from ..cli import _fail, _user_errors, host_cache, set_cpu_dot

    with _user_errors():
        if max_queue < 0 or snapshots < 0:
            _fail("--max-queue and --snapshots must be >= 0", 2)
        import uvicorn

        from .. import load
        from ..engine.runtime import parse_size
        from ..engine.session import Session
        from ..server import create_app

        if compute_threads:
            import torch

            torch.set_num_threads(compute_threads)
        set_cpu_dot(cpu_dot, device)
        m = load(
            model,
            device=device,
            expert_cache=host_cache(expert_cache, device),
            gpu_expert_cache=gpu_expert_cache,
            io=io,
            threads=threads,
            experts_per_token=experts_per_token,
            resident=resident,
        )
        if m.tokenizer is None:
            _fail(f"{m.path}: no tokenizer.json: the server needs the model's tokenizer")
        session = Session(m, max_snapshots=snapshots, snapshot_bytes=parse_size(snapshot_memory))
        app = create_app(session=session, name=name, max_queue=max_queue, max_context=max_context)
        st = app.state.server
        typer.echo(
            f"serving {m.path} as '{st.name}' on http://{host}:{port}/v1 "
            f"(context {st.max_context} tokens, queue {max_queue})",
            err=True,
        )
        uvicorn.run(app, host=host, port=port, log_level=log_level)


def register(app: typer.Typer) -> None:
    app.command()(serve)
