"""The `depthwave` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from depthwave.errors import DepthwaveError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fast, faithful inference for recurrent-depth language models.",
)


def _fail(message: str) -> None:
    typer.echo(f"depthwave: error: {message}", err=True)
    raise typer.Exit(2)


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        _fail(f"{what} must be integers separated by commas or spaces, got {text!r}")
        raise AssertionError from None


class _TextStreamer:
    """Prints decoded text as tokens arrive; decodes the whole output each time so multi-token characters and
    merges come out right, and holds back a trailing incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, token: int) -> None:
        self.tokens.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = self.tokenizer.decode(self.tokens)
            if text.endswith("\ufffd"):
                return
            sys.stdout.write(text[self.printed :])
            self.printed = len(text)
        sys.stdout.flush()


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a Hugging Face hub id.")] = "builtin",
    prompt: Annotated[str | None, typer.Option(help="Prompt text (needs the model's tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt as raw token ids, e.g. '1,2,3'.")] = None,
    chat: Annotated[bool, typer.Option(help="Render the prompt with the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    sampler: Annotated[str, typer.Option(help="static | adaptive | speculative | diffusion.")] = "static",
    # shared by the samplers (None: the sampler's own default)
    num_steps: Annotated[int | None, typer.Option(help="Recurrences per token / of the prefill.")] = None,
    init_scale: Annotated[float | None, typer.Option(help="Scale of random states; 0 = zeros.")] = None,
    continuous_compute: Annotated[bool | None, typer.Option(help="Warm-start new states from earlier ones.")] = None,
    cache_mode: Annotated[str | None, typer.Option(help="KV cache: per-step (reference 'full') | shared.")] = None,
    # static
    warm_start: Annotated[str | None, typer.Option(help="static: latent for continuous compute, normed|raw.")] = None,
    # diffusion
    inner_recurrence: Annotated[int | None, typer.Option(help="diffusion: r', recurrences per step.")] = None,
    exit_threshold: Annotated[
        float | None, typer.Option(help="diffusion: ε of the latent freeze rules; adaptive: the criterion's.")
    ] = None,
    momentum: Annotated[float | None, typer.Option(help="diffusion: η on the input embeddings.")] = None,
    noise: Annotated[float | None, typer.Option(help="diffusion: β, state noise per step.")] = None,
    dampened_noise: Annotated[bool | None, typer.Option(help="diffusion: divide noise by 1 + recurrences.")] = None,
    sqrt_noise: Annotated[bool | None, typer.Option(help="diffusion: variance-preserving noise mixing.")] = None,
    headway: Annotated[int | None, typer.Option(help="diffusion: new positions per step.")] = None,
    max_wavefront: Annotated[int | None, typer.Option(help="diffusion: positions in flight (0 = no cap).")] = None,
    freeze: Annotated[
        str | None, typer.Option(help="diffusion: latent-diff|fixed|token-stability|latent-acceleration.")
    ] = None,
    full_prefill: Annotated[bool | None, typer.Option(help="diffusion: full-depth pass over the prompt first.")] = None,
    max_sampler_steps: Annotated[int | None, typer.Option(help="diffusion: safety cap on steps.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="diffusion, speculative: default | reference (token-exact to the official code)."),
    ] = None,
    # adaptive
    criterion: Annotated[
        str | None,
        typer.Option(help="adaptive: latent-diff|kl|minp-kl|entropy-diff|argmax-stability|cosine|none."),
    ] = None,
    min_steps: Annotated[int | None, typer.Option(help="adaptive: recurrences before the first check.")] = None,
    check_every: Annotated[int | None, typer.Option(help="adaptive: check every n-th recurrence.")] = None,
    exit_in_prefill: Annotated[bool | None, typer.Option(help="adaptive: the prompt may exit early.")] = None,
    # speculative
    draft_steps: Annotated[int | None, typer.Option(help="speculative: recurrences per draft token.")] = None,
    lookahead: Annotated[int | None, typer.Option(help="speculative: drafts per round.")] = None,
    verification_threshold: Annotated[
        float | None, typer.Option(help="speculative: 1 = exact; < 1 accepts q(draft) >= t·max q (greedy).")
    ] = None,
    trace_out: Annotated[
        Path | None, typer.Option(help="diffusion: record a per-step trace; write PNG here and JSON beside it.")
    ] = None,
    # token selection
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    top_p_rule: Annotated[str, typer.Option(help="standard | reference (Huginn's boundary rule).")] = "standard",
    min_p: Annotated[float, typer.Option(help="0 = off.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    stop_token_ids: Annotated[str | None, typer.Option(help="Extra stop token ids, e.g. '7,9'.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ignore the model's own stop tokens.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling and random states.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (the config's), float32, bfloat16, float16.")] = "auto",
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object: tokens, text, stats.")] = False,
    stream: Annotated[bool, typer.Option(help="Stream text to the terminal as it is generated.")] = True,
) -> None:
    """Generate a continuation of a prompt."""
    from depthwave.llm import LLM
    from depthwave.samplers import SamplingParams

    if (prompt is None) == (prompt_ids is None):
        _fail("give exactly one of --prompt or --prompt-ids")
    sampler_flags = {
        "num_steps": num_steps,
        "init_scale": init_scale,
        "continuous_compute": continuous_compute,
        "cache_mode": cache_mode,
        "warm_start": warm_start,
        "inner_recurrence": inner_recurrence,
        "exit_threshold": exit_threshold,
        "momentum": momentum,
        "noise": noise,
        "dampened_noise": dampened_noise,
        "sqrt_noise": sqrt_noise,
        "headway": headway,
        "max_wavefront": max_wavefront,
        "freeze": freeze,
        "full_prefill": full_prefill,
        "max_sampler_steps": max_sampler_steps,
        "mode": mode,
        "criterion": criterion,
        "min_steps": min_steps,
        "check_every": check_every,
        "exit_in_prefill": exit_in_prefill,
        "draft_steps": draft_steps,
        "lookahead": lookahead,
        "verification_threshold": verification_threshold,
        "trace": True if trace_out is not None else None,
    }
    if trace_out is not None and sampler != "diffusion":
        _fail("--trace-out records the diffusion sampler's steps; use it with --sampler diffusion")
    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
            stop_token_ids=tuple(_parse_ids(stop_token_ids, "--stop-token-ids")) if stop_token_ids else (),
            ignore_eos=ignore_eos,
            seed=seed,
            top_p_rule=top_p_rule,  # type: ignore[arg-type]
        )
        llm = LLM(model, device=device, dtype=dtype)
        engine = llm.sampler(sampler, **{k: v for k, v in sampler_flags.items() if v is not None})
        ids = llm.encode(
            prompt if prompt is not None else _parse_ids(prompt_ids or "", "--prompt-ids"), chat=chat, system=system
        )
        streamer = _TextStreamer(llm.tokenizer) if stream and not json_output else None
        result = engine.generate(ids, params, on_token=streamer)
    except DepthwaveError as exc:
        _fail(str(exc))
        return
    record = {"model": model, "sampler": sampler, **result.to_dict()}
    if trace_out is not None:
        trace_out.parent.mkdir(parents=True, exist_ok=True)
        trace_out.with_suffix(".json").write_text(json.dumps(record))
        try:
            _render_trace(record, trace_out)
        except DepthwaveError as exc:
            _fail(str(exc))
    if json_output:
        typer.echo(json.dumps(record))
        return
    if streamer is None:
        typer.echo(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    else:
        typer.echo()
    s = result.stats
    extra = ""
    if "sampler_steps" in s.extra:
        extra = f"; {s.extra['sampler_steps']} sampler steps, {s.extra['tokens_per_sampler_step']:.2f} tokens/step"
    elif "acceptance_rate" in s.extra:
        extra = f"; {s.extra['rounds']} rounds, {100 * s.extra['acceptance_rate']:.0f}% of drafts accepted"
    elif "early_exits" in s.extra:
        extra = f"; {s.extra['early_exits']} early exits"
    typer.echo(
        f"[{s.generated_tokens} tokens, {result.finish_reason}; prefill {s.prefill_time_s * 1e3:.1f} ms for "
        f"{s.prompt_tokens} prompt tokens; decode {s.tokens_per_s:.1f} tokens/s; "
        f"{s.core_steps_per_token:.1f} recurrences/token; KV cache {s.cache_bytes_per_position} B/position{extra}]",
        err=True,
    )


def _render_trace(record: dict[str, Any], png: Path) -> None:
    from depthwave.viz import plot_trace

    trace = record.get("stats", {}).get("extra", {}).get("trace")
    if not trace:
        _fail("this result holds no diffusion trace (generate with --sampler diffusion --trace-out PATH)")
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
        _render_trace(record, out or result.with_suffix(".png"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        _fail(f"cannot read a generation result from {result}: {exc}")
    except DepthwaveError as exc:
        _fail(str(exc))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train a recurrent-depth model with the Huginn recipe (see `depthwave train --help`)."""
    from depthwave.train import main as train_main

    raise typer.Exit(train_main(ctx.args, prog="depthwave train"))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
