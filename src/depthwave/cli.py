"""The `depthwave` command line."""

from __future__ import annotations

import json
import sys
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
    model: Annotated[str, typer.Option(help="Model folder or Hugging Face hub id.")],
    prompt: Annotated[str | None, typer.Option(help="Prompt text (needs the model's tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt as raw token ids, e.g. '1,2,3'.")] = None,
    chat: Annotated[bool, typer.Option(help="Render the prompt with the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    sampler: Annotated[str, typer.Option(help="Generation algorithm.")] = "static",
    num_steps: Annotated[int | None, typer.Option(help="Recurrences per token (default: mean_recurrence).")] = None,
    init_scale: Annotated[float, typer.Option(help="Scale of the random initial state; 0 = zeros.")] = 0.0,
    continuous_compute: Annotated[bool, typer.Option(help="Warm-start each token from the previous latent.")] = False,
    warm_start: Annotated[str, typer.Option(help="Latent used by continuous compute: normed|raw.")] = "normed",
    cache_mode: Annotated[str, typer.Option(help="KV cache: per-step (reference-exact) or shared.")] = "per-step",
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="0 = off.")] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    top_p_rule: Annotated[str, typer.Option(help="standard | reference (Huginn's boundary rule).")] = "standard",
    min_p: Annotated[float, typer.Option(help="0 = off.")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option()] = 256,
    stop_token_ids: Annotated[str | None, typer.Option(help="Extra stop token ids, e.g. '7,9'.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ignore the model's own stop tokens.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling and random states.")] = None,
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
        engine = llm.sampler(
            sampler,
            num_steps=num_steps,
            init_scale=init_scale,
            continuous_compute=continuous_compute,
            warm_start=warm_start,
            cache_mode=cache_mode,
        )
        ids = llm.encode(
            prompt if prompt is not None else _parse_ids(prompt_ids or "", "--prompt-ids"), chat=chat, system=system
        )
        streamer = _TextStreamer(llm.tokenizer) if stream and not json_output else None
        result = engine.generate(ids, params, on_token=streamer)
    except DepthwaveError as exc:
        _fail(str(exc))
        return
    if json_output:
        typer.echo(json.dumps({"model": model, "sampler": sampler, **result.to_dict()}))
        return
    if streamer is None:
        typer.echo(result.text if result.text is not None else " ".join(map(str, result.token_ids)))
    else:
        typer.echo()
    s = result.stats
    typer.echo(
        f"[{s.generated_tokens} tokens, {result.finish_reason}; prefill {s.prefill_time_s * 1e3:.1f} ms for "
        f"{s.prompt_tokens} prompt tokens; decode {s.tokens_per_s:.1f} tokens/s; "
        f"{s.core_steps_per_token:.1f} recurrences/token; KV cache {s.cache_bytes_per_position} B/position]",
        err=True,
    )


@app.callback()
def _root() -> None:
    """Keeps `depthwave generate` a subcommand while there is only one command."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
