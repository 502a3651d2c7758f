"""`depthwave generate` and `depthwave trace`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from depthwave.cli.common import (
    COMPILE_HELP,
    THREADS_HELP,
    CommandError,
    app,
    check_writable_file,
    parse_ids,
    with_sampler_flags,
)
from depthwave.engine.output import TextStream
from depthwave.engine.selection import SamplingParams


class _TextStreamer:
    """Prints text as tokens arrive (stop strings held back, multi-byte characters whole; token ids without a
    tokenizer); `finish` prints the rest, from the result's text, which is cut at the first stop string."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]) -> None:
        self.text = TextStream(tokenizer, stops) if tokenizer is not None else None

    def __call__(self, token: int) -> None:
        sys.stdout.write(f"{token} " if self.text is None else self.text.add([token]))
        sys.stdout.flush()

    def finish(self, final: str | None) -> None:
        if self.text is not None:
            sys.stdout.write(self.text.finish(final))
        sys.stdout.write("\n")


@app.command()
@with_sampler_flags
def generate(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a Hugging Face hub id.")] = "builtin",
    prompt: Annotated[str | None, typer.Option(help="Prompt text (needs the model's tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt as raw token ids, e.g. '1,2,3'.")] = None,
    chat: Annotated[bool, typer.Option(help="Render the prompt with the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            help="diffusion (the paper's defaults), static, adaptive or speculative; default: diffusion, or static "
            "for Ouro models."
        ),
    ] = None,
    trace_out: Annotated[
        Path | None, typer.Option(help="diffusion: record a per-step trace; write PNG here and JSON beside it.")
    ] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    top_p_rule: Annotated[str, typer.Option(help="standard, or reference (Huginn's boundary rule).")] = "standard",
    min_p: Annotated[float, typer.Option(help="0 = off.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    stop_token_ids: Annotated[str | None, typer.Option(help="Extra stop token ids, e.g. '7,9'.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); the text ends before it.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ignore the model's own stop tokens.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling and random states.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (the config's), float32, bfloat16, float16.")] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    compile: Annotated[bool, typer.Option(help=COMPILE_HELP)] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object: tokens, text, stats.")] = False,
    stream: Annotated[bool, typer.Option(help="Stream text to the terminal as it is generated.")] = True,
    *,
    sampler_flags: dict[str, Any],
) -> None:
    """Generate a continuation of a prompt. Every sampler parameter is a flag (--inner-recurrence 8, ...); a flag
    the chosen --sampler does not have is refused."""
    from depthwave.llm import LLM

    if (prompt is None) == (prompt_ids is None):
        raise CommandError("give exactly one of --prompt or --prompt-ids")
    if system is not None and not chat:
        raise CommandError("--system is a chat message; add --chat")
    if trace_out is not None:
        if sampler not in (None, "diffusion"):
            raise CommandError("--trace-out records the diffusion sampler's steps; use it with --sampler diffusion")
        check_writable_file(trace_out, "--trace-out")
        sampler_flags["trace"] = True
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        max_new_tokens=max_new_tokens,
        stop_token_ids=tuple(parse_ids(stop_token_ids, "--stop-token-ids")) if stop_token_ids else (),
        stop=tuple(stop or ()),
        ignore_eos=ignore_eos,
        seed=seed,
        top_p_rule=top_p_rule,  # type: ignore[arg-type]
    )
    llm = LLM(model, device=device, dtype=dtype, threads=threads, compile=compile)
    one_prompt = llm.sampler(sampler, **sampler_flags)
    if compile:
        warm_up(llm)
    ids = llm.encode(prompt if prompt is not None else parse_ids(prompt_ids or "", "--prompt-ids"), chat, system)
    streamer = _TextStreamer(llm.tokenizer, params.stop) if stream and not json_output else None
    result = one_prompt.generate(ids, params, on_token=streamer)
    record = {"model": model, "sampler": one_prompt.params.name, **result.to_dict()}
    if trace_out is not None:
        trace_out.parent.mkdir(parents=True, exist_ok=True)
        trace_out.with_suffix(".json").write_text(json.dumps(record))
        render_trace(record, trace_out)
    if json_output:
        typer.echo(json.dumps(record))
        return
    if streamer is None:
        typer.echo(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    else:
        streamer.finish(result.text)
    typer.echo(f"[{result.finish_reason}; {result.stats.summary()}]", err=True)


def warm_up(llm: Any) -> None:
    """Compile the graphs a one-row engine reaches, with a progress bar, and say how long it took."""
    from depthwave.engine import Engine, EngineConfig

    engine = Engine(llm.model, llm.tokenizer, llm.stop_token_ids, EngineConfig(max_num_seqs=1, compile=True))
    typer.echo(f"[compiled in {engine.warmup(progress=True):.1f} s]", err=True)


def render_trace(record: dict[str, Any], png: Path) -> None:
    from depthwave.viz import plot_trace

    stats = record.get("stats", {})
    # Results written before the stats were typed kept the trace under "extra".
    trace = stats.get("trace") or stats.get("extra", {}).get("trace")
    if not trace:
        raise CommandError("this result holds no diffusion trace (generate with --sampler diffusion --trace-out PATH)")
    title = f"{record.get('model', '')}: {len(record['token_ids'])} tokens in {len(trace)} sampler steps"
    plot_trace(trace, len(record["prompt_token_ids"]), png, title)
    typer.echo(f"wrote {png}", err=True)


@app.command()
def trace(
    result: Annotated[Path, typer.Argument(help="JSON written by `generate --trace-out`.")],
    out: Annotated[Path | None, typer.Option(help="PNG path (default: beside the JSON).")] = None,
) -> None:
    """Render a diffusion trace: positions by sampler steps, the wavefront moving diagonally."""
    try:
        record = json.loads(result.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CommandError(f"cannot read a generation result from {result}: {exc}") from None
    if not isinstance(record, dict) or not {"token_ids", "prompt_token_ids"} <= set(record):
        raise CommandError(f"cannot read a generation result from {result}: not a `generate --json` record")
    render_trace(record, out or result.with_suffix(".png"))
