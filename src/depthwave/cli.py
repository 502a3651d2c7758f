"""The `depthwave` command line."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from depthwave.errors import DepthwaveError, file_in_the_way, one_line

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: rich's option table cuts long option names and choices at 80 columns.
    rich_markup_mode=None,
)


def _fail(message: str) -> None:
    typer.echo(f"depthwave: error: {one_line(message)}", err=True)
    raise typer.Exit(2)


def _check_listen_address(host: str, port: int) -> None:
    """Refuse, before the model loads, a port out of range or an address this machine cannot listen on (taken,
    or not one of its own)."""
    import socket

    if not 0 <= port <= 65535:
        _fail(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(infos[0][4])
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


def _check_writable_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output path that cannot become a file: it is a folder, or a file stands where
    one of its folders should be."""
    if path.is_dir():
        _fail(f"{what} {path} is a folder; give a file path")
    blocking = file_in_the_way(path)
    if blocking is not None:
        _fail(f"{what} {path}: {blocking} is a file, not a folder")


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        _fail(f"{what} must be integers separated by commas or spaces, got {text!r}")
        raise AssertionError from None


class _TextStreamer:
    """Prints text as tokens arrive, never splitting a multi-byte character (token ids without a tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        from depthwave.engine.output import TextStream

        self.text = TextStream(tokenizer) if tokenizer is not None else None

    def __call__(self, token: int) -> None:
        sys.stdout.write(f"{token} " if self.text is None else self.text.add([token]))
        sys.stdout.flush()


THREADS_HELP = (
    "torch CPU threads (default: 1 for models under 512 wide, where a second thread does not pay and collapses "
    "when another process holds a core; else every available core; OMP_NUM_THREADS wins over the default)."
)


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a Hugging Face hub id.")] = "builtin",
    prompt: Annotated[str | None, typer.Option(help="Prompt text (needs the model's tokenizer).")] = None,
    prompt_ids: Annotated[str | None, typer.Option(help="Prompt as raw token ids, e.g. '1,2,3'.")] = None,
    chat: Annotated[bool, typer.Option(help="Render the prompt with the model's chat template.")] = False,
    system: Annotated[str | None, typer.Option(help="System message (with --chat).")] = None,
    sampler: Annotated[
        str, typer.Option(help="diffusion (the paper's defaults) | static | adaptive | speculative.")
    ] = "diffusion",
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
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable); the text ends before it.")] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Ignore the model's own stop tokens.")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling and random states.")] = 0,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ... (default: cuda if available).")] = None,
    dtype: Annotated[str, typer.Option(help="auto (the config's), float32, bfloat16, float16.")] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
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
    if system is not None and not chat:
        _fail("--system is a chat message; add --chat")
    if trace_out is not None and sampler != "diffusion":
        _fail("--trace-out records the diffusion sampler's steps; use it with --sampler diffusion")
    if trace_out is not None:
        _check_writable_file(trace_out, "--trace-out")
    try:
        params = SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            max_new_tokens=max_new_tokens,
            stop_token_ids=tuple(_parse_ids(stop_token_ids, "--stop-token-ids")) if stop_token_ids else (),
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
            seed=seed,
            top_p_rule=top_p_rule,  # type: ignore[arg-type]
        )
        llm = LLM(model, device=device, dtype=dtype, threads=threads)
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
    typer.echo(f"[{result.finish_reason}; {result.stats.summary()}]", err=True)


def _render_trace(record: dict[str, Any], png: Path) -> None:
    from depthwave.viz import plot_trace

    stats = record.get("stats", {})
    # Results written before the stats were typed kept the trace under "extra".
    trace = stats.get("trace") or stats.get("extra", {}).get("trace")
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


def _eval_settings(
    model: str,
    tasks: str,
    samplers: str,
    limit: int | None,
    seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int | None,
    chat: bool | None,
    system: str | None,
    data: list[str],
    device: str | None,
    dtype: str,
    threads: int | None,
    batch_size: int,
) -> Any:
    from depthwave.eval.harness import EvalSettings
    from depthwave.samplers.registry import parse_specs

    files = {}
    for item in data:
        name, eq, path = item.partition("=")
        if not eq:
            _fail(f"--data expects TASK=PATH, got {item!r}")
        files[name] = path
    return EvalSettings(
        model=model,
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        samplers=tuple(parse_specs(samplers)),
        limit=limit,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        chat=chat,
        system=system,
        data=files,
        device=device,
        dtype=dtype,
        threads=threads,
        batch_size=batch_size,
    )


BATCH_SIZE_HELP = "Requests per batch: each sampler runs a chunk of this many samples together (1 = one at a time)."


class _EvalProgress:
    """A progress bar over (sample, sampler) records with running accuracy per sampler, and its tokens/s as the
    summary computes them: the finished batches' decoded tokens over their decode-pass time (requests of a batch
    decode at the same time, so the sum of their own decode times would count that time many times over)."""

    def __init__(self, settings: Any, folder: Path) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from depthwave.eval.harness import BATCHES_FILE, read_records

        self.accuracy: dict[str, list[int]] = {}
        self.speed: dict[str, list[float]] = {}
        self.records(read_records(folder))
        self.batches(read_records(folder, BATCHES_FILE))
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self.bar = self.progress.add_task("eval", total=None)

    def records(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            total = self.accuracy.setdefault(f"{record['task']}/{record['sampler']}", [0, 0])
            total[0] += 1
            total[1] += record["correct"]
        self._show(len(records))

    def batches(self, lines: list[dict[str, Any]]) -> None:
        for line in lines:
            total = self.speed.setdefault(f"{line['task']}/{line['sampler']}", [0, 0.0])
            total[0] += line["decoded_tokens"]
            total[1] += line["decode_s"]
        self._show(0)

    def _show(self, advance: int) -> None:
        if not hasattr(self, "progress"):
            return
        shown = "  ".join(
            f"{name} {100 * correct / n:.0f}%" + self._rate(name) for name, (n, correct) in self.accuracy.items()
        )
        self.progress.update(self.bar, advance=advance, description=shown)

    def _rate(self, name: str) -> str:
        tokens, seconds = self.speed.get(name, (0, 0.0))
        return f" {tokens / seconds:.0f} tok/s" if seconds > 0 else ""


def _run_with_progress(settings: Any, folder: Path, run: Any) -> Any:
    from depthwave.eval.harness import load_samples, pending_work, prepare_folder
    from depthwave.eval.tasks import get_task

    # The data before the folder: a bad data path must not leave a settings.json that refuses the corrected rerun.
    samples = load_samples(settings, {name: get_task(name) for name in settings.tasks})
    done = prepare_folder(folder, settings)
    labels = [s.label for s in settings.samplers]
    pending = sum(len(labels) - len(skip) for *_, skip in pending_work(samples, labels, done))
    progress = _EvalProgress(settings, folder)
    progress.progress.update(progress.bar, total=pending)
    with progress.progress:
        return run(progress)


def _print_summary(summary: dict[str, Any], folder: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['settings']['model']} (baseline {summary['baseline']})")
    columns = ("task", "sampler", "n", "errors", "accuracy", "Δ acc", "tokens/s", "speedup", "prefill ms", "recur/tok")
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "sampler") else "right")
    for row in summary["rows"]:
        table.add_row(
            row["task"],
            row["sampler"],
            str(row["samples"]),
            str(row["errors"]),
            f"{100 * row['accuracy']:.1f}%",
            f"{100 * row['accuracy_delta']:+.1f}" if "accuracy_delta" in row else "-",
            f"{row['tokens_per_s']:.1f}",
            f"{row['speedup']:.2f}x" if row.get("speedup") else "-",
            f"{row['median_prefill_ms']:.1f}",
            f"{row['recurrences_per_token']:.1f}",
        )
    Console(stderr=True, width=None if sys.stderr.isatty() else 160).print(table)
    typer.echo(f"wrote {folder / 'samples.jsonl'}, summary.json, table.md", err=True)


EVAL_SAMPLERS_HELP = (
    "Comma-separated samplers, each NAME or NAME(key=value,...), optionally LABEL=NAME(...): "
    "e.g. 'static,adaptive,speculative(draft_steps=2,lookahead=8),diffusion'."
)


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a hub id.")] = "builtin",
    tasks: Annotated[str, typer.Option(help="Comma-separated: arithmetic, gsm8k, math500, humaneval, mbpp.")] = (
        "arithmetic"
    ),
    samplers: Annotated[str, typer.Option(help=EVAL_SAMPLERS_HELP)] = "diffusion",
    limit: Annotated[int | None, typer.Option(help="First N samples of each task.")] = None,
    seed: Annotated[int, typer.Option(help="Sample i uses seed*1000003+i.")] = 0,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    max_new_tokens: Annotated[int | None, typer.Option(help="Default: each task's.")] = None,
    chat: Annotated[bool | None, typer.Option(help="Force chat/plain prompts (default: each task's choice).")] = None,
    system: Annotated[str | None, typer.Option(help="Replace the tasks' system prompt.")] = None,
    data: Annotated[list[str] | None, typer.Option(help="TASK=PATH: a local data file or folder.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (resumes if it holds the same run).")] = Path("runs/eval"),
    workers: Annotated[int, typer.Option(help="Ray workers, one model replica each (1 = this process).")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="Join this Ray cluster instead of a local one.")] = None,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP + " Per process with --workers.")] = None,
    batch_size: Annotated[int, typer.Option(help=BATCH_SIZE_HELP)] = 64,
) -> None:
    """Evaluate samplers on benchmark tasks: the paper's table of accuracy and tokens/s."""
    from depthwave.eval.harness import run_eval

    try:
        settings = _eval_settings(
            model,
            tasks,
            samplers,
            limit,
            seed,
            temperature,
            top_p,
            max_new_tokens,
            chat,
            system,
            data or [],
            device,
            dtype,
            threads,
            batch_size,
        )
        summary = _run_with_progress(
            settings,
            out,
            lambda p: run_eval(settings, out, workers, ray_address, on_records=p.records, on_batches=p.batches),
        )
    except DepthwaveError as exc:
        _fail(str(exc))
        return
    _print_summary(summary, out)


@app.command()
def sweep(
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a hub id.")] = "builtin",
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks.")] = "arithmetic",
    param: Annotated[
        list[str] | None,
        typer.Option(help="NAME=v1,v2,... (repeatable); default: r', ε, β, η and wavefront around the paper's."),
    ] = None,
    base: Annotated[
        str, typer.Option(help="Fixed diffusion parameters for every variant, e.g. 'diffusion(num_steps=32)'.")
    ] = "diffusion",
    limit: Annotated[int | None, typer.Option(help="First N samples of each task.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    temperature: Annotated[float, typer.Option()] = 0.0,
    max_new_tokens: Annotated[int | None, typer.Option()] = None,
    data: Annotated[list[str] | None, typer.Option(help="TASK=PATH.")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (records, table, PNG plots).")] = Path("runs/sweep"),
    workers: Annotated[int, typer.Option(help="Ray workers.")] = 1,
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option()] = "auto",
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP)] = None,
    batch_size: Annotated[int, typer.Option(help=BATCH_SIZE_HELP)] = 64,
) -> None:
    """Sweep the diffusion sampler's parameters one at a time; Pareto and per-parameter plots."""
    from depthwave.eval.sweep import parse_grid, run_sweep, sweep_settings

    try:
        given = _eval_settings(
            model,
            tasks,
            base,
            limit,
            seed,
            temperature,
            1.0,
            max_new_tokens,
            None,
            None,
            data or [],
            device,
            dtype,
            threads,
            batch_size,
        )
        grid = parse_grid(param or [])
        settings, fixed = sweep_settings(given, grid)
        summary = _run_with_progress(
            settings,
            out,
            lambda p: run_sweep(settings, grid, fixed, out, workers, on_records=p.records, on_batches=p.batches),
        )
    except DepthwaveError as exc:
        _fail(str(exc))
        return
    _print_summary(summary, out)
    typer.echo(f"plots in {out}", err=True)


def parse_sampler_flags(args: list[str]) -> dict[str, Any]:
    """`--inner-recurrence 8 --exit-threshold=0.05 --continuous-compute --no-full-prefill` as sampler parameters."""
    from depthwave.samplers.registry import parse_literal

    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            _fail(f"unexpected argument {arg!r}; sampler parameters are given as --name value")
        name, eq, value = arg[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            out[key] = parse_literal(value)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[key] = parse_literal(args[i + 1])
            i += 1
        elif key.startswith("no_"):
            out[key[3:]] = False
        else:
            out[key] = True
        i += 1
    return out


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="'builtin', a model folder or a hub id.")] = "builtin",
    host: Annotated[str, typer.Option(help="Interface to listen on (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8000,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="The model id clients use (default: --model).")] = None,
    sampler: Annotated[
        str, typer.Option(help="Default sampler; its parameters follow as flags, e.g. --inner-recurrence 8.")
    ] = "diffusion",
    device: Annotated[str | None, typer.Option()] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = "auto",
    max_num_seqs: Annotated[int, typer.Option(help="Requests in the batch at once (engine rows).")] = 64,
    max_model_len: Annotated[int | None, typer.Option(help="Cached positions per request (default: context).")] = None,
    admission_delay: Annotated[
        float,
        typer.Option(
            help="Hold newcomers until the oldest waited this many prefill-pass times, so prefills batch (0: at once)."
        ),
    ] = 4.0,
    max_waiting: Annotated[int, typer.Option(help="Waiting requests before new ones get 429.")] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1 << 20,
    shutdown_grace: Annotated[float, typer.Option(help="Seconds running requests get to finish on SIGTERM.")] = 30.0,
    threads: Annotated[int | None, typer.Option(help=THREADS_HELP + " Per replica with --replicas.")] = None,
    replicas: Annotated[
        int, typer.Option(help="Engine replicas behind Ray Serve's HTTP proxy (one GPU each on CUDA); 0: no Ray.")
    ] = 0,
    ray_address: Annotated[
        str | None, typer.Option(help="With --replicas: join this Ray cluster instead of a private loopback one.")
    ] = None,
) -> None:
    """Serve the model over the OpenAI HTTP API (completions, chat completions, streaming) with continuous
    batching. Sampler flags after the options set the default sampler's parameters; a request may choose its own
    with the body fields `sampler` and the parameters' names (`extra_body` in the openai client)."""
    try:
        import uvicorn

        from depthwave.samplers import registry
        from depthwave.serve.app import ServeSettings, create_app
    except ImportError as exc:
        _fail(f"the server needs the serve extra (pip install 'depthwave[serve]'): {exc}")
        return
    if threads is not None and threads < 1:
        _fail(f"--threads must be >= 1, got {threads}")
    _check_listen_address(host, port)
    flags = parse_sampler_flags(ctx.args)
    try:
        # The engine's KV cache is the default sampler's (the server's own default: shared); requests run on it.
        cache_mode = flags.pop("cache_mode", "shared")
        settings = ServeSettings(
            model=model,
            served_model_name=served_model_name,
            sampler=registry.make(sampler, engine_cache=cache_mode, **flags),
            cache_mode=cache_mode,
            device=device,
            dtype=None if dtype == "auto" else dtype,
            api_key=api_key,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
            admission_delay=admission_delay,
            max_waiting=max_waiting,
            max_body_bytes=max_body_bytes,
            threads=threads,
        )
    except DepthwaveError as exc:
        _fail(str(exc))
        return
    if replicas < 0:
        _fail(f"--replicas must be >= 0, got {replicas}")
        return
    typer.echo(f"depthwave: serving {settings.name} on http://{host}:{port}/v1 (default sampler {sampler})", err=True)
    if replicas:
        from depthwave.serve.replicas import serve_replicas

        try:
            serve_replicas(settings, replicas, host, port, threads, ray_address, shutdown_grace)
        except DepthwaveError as exc:
            _fail(str(exc))
        return
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=shutdown_grace
    )


@app.command("lm-eval-tasks")
def lm_eval_tasks(
    out: Annotated[Path, typer.Argument(help="Folder for the task YAMLs (lm-eval's --include_path).")] = Path(
        "lm_eval_tasks"
    ),
    data: Annotated[
        Path | None, typer.Option(help="JSON-lines file with question and answer (default: the shipped test set).")
    ] = None,
) -> None:
    """Write lm-eval tasks for the built-in model's arithmetic problems, reading local files (offline):
    depthwave_arithmetic (generation), depthwave_arithmetic_chat (the bare question, for --apply_chat_template)
    and depthwave_arithmetic_mc (multiple choice by log-likelihood)."""
    from depthwave.eval.lm_harness import write_tasks

    try:
        written = write_tasks(out, data)
    except DepthwaveError as exc:
        _fail(str(exc))
        return
    for path in written:
        typer.echo(f"wrote {path}", err=True)
    # The command to run next; lm-eval's own default device (cuda:0) is replaced by this machine's (see lm_harness).
    typer.echo(
        f"lm_eval --model depthwave --model_args pretrained=builtin --include_path {out} "
        "--tasks depthwave_arithmetic,depthwave_arithmetic_mc"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def train(ctx: typer.Context) -> None:
    """Train a recurrent-depth model with the Huginn recipe (see `depthwave train --help`)."""
    from depthwave.train import main as train_main

    raise typer.Exit(train_main(ctx.args, prog="depthwave train"))


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        import torch

        typer.echo(f"depthwave {version('depthwave')} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Fast, faithful inference for recurrent-depth language models. Add --debug to see a traceback on errors."""


def _click_exceptions() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    """(usage errors, "no arguments: show the help", aborts) of click and of the copy of click that typer >= 0.22
    vendors: which one parses the command line depends on typer's version."""
    modules = []
    for name in ("click.exceptions", "typer._click.exceptions"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return (
        tuple(m.UsageError for m in modules),
        tuple(m.NoArgsIsHelpError for m in modules if hasattr(m, "NoArgsIsHelpError")),
        (typer.Abort, *(m.Abort for m in modules if hasattr(m, "Abort"))),
    )


def main() -> None:
    """The `depthwave` command. A user error, a command-line mistake included, is one line `depthwave: error: ...`
    on stderr and exit status 2; anything unexpected is one line naming the exception and exit status 1, or its
    traceback with `--debug` (anywhere on the line)."""
    usage_errors, no_args, aborts = _click_exceptions()
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv = [arg for i, arg in enumerate(sys.argv) if i == 0 or arg != "--debug"]
    try:
        code = app(standalone_mode=False)
    except no_args as exc:
        typer.echo(exc.format_message())
        code = 0
    except usage_errors as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "depthwave"
        print(f"depthwave: error: {one_line(exc.format_message())} (see {command} --help)", file=sys.stderr)
        sys.exit(2)
    except DepthwaveError as exc:
        if debug:
            raise
        print(f"depthwave: error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, *aborts):
        print("depthwave: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        print(
            f"depthwave: internal error: {type(exc).__name__}: {one_line(str(exc))} (run again with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
