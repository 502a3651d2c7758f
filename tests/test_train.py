"""The training recipe: depth sampling, truncated backprop, schedule, batching, a smoke run, resuming."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

from depthwave.data.arithmetic import make_split, train_batch
from depthwave.data.tokenizer import special_token_ids, train_arithmetic_tokenizer
from depthwave.engine.selection import SamplingParams
from depthwave.llm import LLM
from depthwave.model.loading import load_model
from depthwave.model.model import RecurrentDepthModel
from depthwave.train import (
    CHECKPOINT_DIR,
    IGNORE_INDEX,
    PRESETS,
    TrainConfig,
    TrainingError,
    _step_generator,
    accumulate_gradients,
    collate,
    encode_problem,
    greedy_accuracy,
    learning_rate,
    length_buckets,
    looped_loss,
    main,
    recurrent_loss,
    resolve_precision,
    sample_recurrence,
    train,
)


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return train_arithmetic_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    # These models are too small to gain from a second thread, and on a busy machine two OpenMP threads wait on
    # each other for most of the run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smoke(out_dir: Path, **overrides: object) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), **{**PRESETS["smoke"], **overrides})  # type: ignore[arg-type]


def quiet(_: str) -> None:
    pass


# ---- the recipe ------------------------------------------------------------------------------------------------
def test_depth_sampler_matches_the_poisson_lognormal_recipe() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = [sample_recurrence(32, 8, generator) for _ in range(4000)]
    totals = [n + k for n, k in draws]
    assert all(1 <= k <= 8 for _, k in draws)
    assert all(n == 0 for n, k in draws if k < 8), "no step without gradient unless all s steps have one"
    # E[p] = E[rate] + 1 = (t + s) + 1: the -sigma²/2 in mu makes the lognormal's mean exactly t + s.
    assert abs(sum(totals) / len(totals) - 33) < 0.8
    assert max(totals) > 60, "the lognormal tail reaches well beyond twice the mean"
    shallow = [sample_recurrence(2, 8, generator) for _ in range(2000)]
    assert abs(sum(n + k for n, k in shallow) / len(shallow) - 9) < 0.5  # t = 0: centred on s
    again = torch.Generator().manual_seed(0)
    assert [sample_recurrence(32, 8, again) for _ in range(50)] == draws[:50]


def test_recurrent_loss_is_the_full_depth_forward_with_grad_only_in_the_last_steps(tokenizer) -> None:  # type: ignore[no-untyped-def]
    config = smoke(Path("unused")).model_config(tokenizer)
    model = RecurrentDepthModel(config)
    model.init_weights(torch.Generator().manual_seed(0))
    pad = special_token_ids(tokenizer)["<|pad|>"]
    inputs, targets = collate([encode_problem(tokenizer, p) for p in train_batch(0, 0, 3)], pad)

    grad_modes: list[bool] = []
    hook = model.transformer.core_block[0].register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    loss = recurrent_loss(model, inputs, targets, 5, 3, torch.Generator().manual_seed(1))
    hook.remove()
    assert grad_modes == [False] * 5 + [True] * 3

    with torch.no_grad():
        logits = model(inputs, num_steps=8, init_scale=1.0, generator=torch.Generator().manual_seed(1)).logits
    expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss.detach(), expected)

    loss.backward()
    # The prelude output is injected into the backpropagated steps, so the prelude learns too.
    assert model.transformer.prelude[0].attn.Wqkv.weight.grad.abs().sum() > 0
    assert model.transformer.adapter.weight.grad.abs().sum() > 0


def test_learning_rate_warms_up_then_decays_to_min_lr() -> None:
    config = TrainConfig(out_dir="x", steps=1000, warmup_steps=100, lr=1e-3, min_lr=1e-4)
    rates = [learning_rate(config, step) for step in range(1000)]
    assert rates[0] == pytest.approx(1e-5)
    assert rates[99] == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[99:]))
    assert rates[-1] == pytest.approx(1e-4)
    assert rates[550] == pytest.approx(5.5e-4, rel=0.02)


def test_collate_trains_on_the_answer_only(tokenizer) -> None:  # type: ignore[no-untyped-def]
    pad = special_token_ids(tokenizer)["<|pad|>"]
    examples = [encode_problem(tokenizer, p) for p in make_split("validation", 4)]
    inputs, targets = collate(examples, pad)
    assert inputs.shape == targets.shape
    for row, (prompt, answer) in enumerate(examples):
        sequence = prompt + answer
        n = len(sequence) - 1
        assert inputs[row, :n].tolist() == sequence[:-1]
        assert (inputs[row, n:] == pad).all()
        assert (targets[row, : len(prompt) - 1] == IGNORE_INDEX).all()
        assert targets[row, len(prompt) - 1 : n].tolist() == answer
        assert (targets[row, n:] == IGNORE_INDEX).all()
        assert tokenizer.decode(answer) == make_split("validation", 4)[row].solution
        assert answer[-1] == special_token_ids(tokenizer)["<|end_turn|>"]


# ---- runs ------------------------------------------------------------------------------------------------------
def test_smoke_training_lowers_the_loss_and_exports_a_loadable_model(tmp_path: Path) -> None:
    config = smoke(tmp_path, eval_every=15, eval_problems=2)
    summary = train(config, write=quiet)
    first, last = sum(summary.losses[:5]) / 5, sum(summary.losses[-5:]) / 5
    assert len(summary.losses) == 30
    assert last < first - 1.0, (first, last)
    assert summary.model_dir == tmp_path / "model"
    log = (tmp_path / "log.jsonl").read_text()
    assert log.count('"event": "validation"') == 2
    # The reported accuracy is the exported model's, measured again from scratch on the same problems.
    exported = load_model(summary.model_dir, "cpu", torch.float32)
    tokenizer = Tokenizer.from_file(str(summary.model_dir / "tokenizer.json"))
    remeasured = greedy_accuracy(exported, tokenizer, make_split("validation", 2, config.data_seed), seed=config.seed)
    assert summary.val_accuracy == remeasured

    llm = LLM(summary.model_dir, device="cpu")
    assert llm.model.config.mean_recurrence == 4
    assert set(llm.stop_token_ids) >= {1, 4}
    result = llm.generate("Ana has 3 apples.", SamplingParams(temperature=0.0, max_new_tokens=5), chat=True)[0]
    assert len(result.token_ids) <= 5 and isinstance(result.text, str)


def test_ouro_training_uses_the_exit_objective_and_exports_an_ouro_checkpoint(tmp_path: Path, tokenizer) -> None:  # type: ignore[no-untyped-def]
    overrides = {"family": "ouro", "prelude_layers": 0, "coda_layers": 0, "core_layers": 2}
    model = RecurrentDepthModel(smoke(Path("unused"), **overrides).model_config(tokenizer))
    model.init_weights(torch.Generator().manual_seed(0))
    examples = [encode_problem(tokenizer, p) for p in train_batch(0, 0, 4)]
    inputs, targets = collate(examples, special_token_ids(tokenizer)["<|pad|>"])
    loss = looped_loss(model, inputs, targets, entropy_weight=0.0)
    # With no entropy term it is the gate-weighted mean of the loops' losses: between the best and worst loop.
    per_loop = []
    state = model.initial_state(model.prelude(inputs))
    for step in range(4):
        state = model.core_step(state, state, step=step)
        per_loop.append(F.cross_entropy(model.head(state).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX))
    assert min(per_loop) - 1e-5 <= loss <= max(per_loop) + 1e-5
    loss.backward()
    assert model.transformer.exit_gate is not None and model.transformer.exit_gate.weight.grad.abs().sum() > 0

    summary = train(smoke(tmp_path, **overrides, steps=20), write=quiet)
    assert sum(summary.losses[-5:]) < sum(summary.losses[:5]) - 2.0, summary.losses
    assert json.loads((summary.model_dir / "config.json").read_text())["model_type"] == "ouro"
    llm = LLM(summary.model_dir, device="cpu")
    assert llm.model.config.family == "ouro" and llm.model.config.mean_recurrence == 4
    out = llm.generate("Ana has 3 apples.", SamplingParams(temperature=0.0, max_new_tokens=4), chat=True)[0]
    assert len(out.token_ids) <= 4
    with pytest.raises(TrainingError, match="prelude_layers and coda_layers"):
        smoke(tmp_path, family="ouro")


def test_resumed_training_equals_uninterrupted_training(tmp_path: Path) -> None:
    straight = train(smoke(tmp_path / "a", steps=12), write=quiet)
    part = train(smoke(tmp_path / "b", steps=12, stop_at=5), write=quiet)
    assert part.model_dir is None and part.end_step == 5
    rest = train(smoke(tmp_path / "b", steps=12), resume=True, write=quiet)
    assert rest.start_step == 5
    assert part.losses + rest.losses == straight.losses
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_guards(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(smoke(tmp_path, steps=4), resume=True, write=quiet)
    train(smoke(tmp_path, steps=4, stop_at=2), write=quiet)
    assert (tmp_path / CHECKPOINT_DIR / "training_state.pt").is_file()
    with pytest.raises(TrainingError, match="already holds a checkpoint"):
        train(smoke(tmp_path, steps=4), write=quiet)
    with pytest.raises(TrainingError, match=r"lr: checkpoint 0\.003, now 0\.001"):
        train(smoke(tmp_path, steps=4, lr=1e-3), resume=True, write=quiet)
    # Settings that only change how the run is watched may differ.
    summary = train(smoke(tmp_path, steps=4, log_every=1, checkpoint_every=1), resume=True, write=quiet)
    assert (summary.start_step, summary.end_step) == (2, 4)


def test_config_validation() -> None:
    base = smoke(Path("x"))
    for change, message in [
        (dict(n_heads=3), "n_heads"),
        (dict(batch_size=0), "batch_size"),
        (dict(min_lr=1.0), "min_lr"),
        (dict(stop_at=31), "stop_at"),
        (dict(precision="fp16"), "precision"),
        (dict(device="tpu"), "device"),
        (dict(beta2=1.0), "beta2"),
    ]:
        with pytest.raises(TrainingError, match=message):
            replace(base, **change)  # type: ignore[arg-type]


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--out", str(out), "--steps", "3", "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "3/3" in printed and "done: model written to" in printed
    assert (out / "model" / "config.json").is_file()
    # Errors: one line on stderr, nothing on stdout, exit status 2.
    assert main(["--preset", "smoke", "--out", str(out), "--steps", "3"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("depthwave: error: ") and "already holds a checkpoint" in captured.err
    assert captured.err.count("\n") == 1
    assert main(["--preset", "smoke", "--out", str(tmp_path / "other"), "--lr", "-1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "training setting 'lr' must be a number >= 0, got -1.0" in captured.err
    assert main(["--preset", "smoke", "--out", str(out), "--resume", "--steps", "4"]) == 2
    captured = capsys.readouterr()
    assert "cannot resume" in captured.err and "steps: checkpoint 3, now 4" in captured.err
    assert captured.err.count("\n") == 1


def test_init_from_continues_a_model_on_the_wide_problems(tmp_path: Path) -> None:
    first = train(smoke(tmp_path / "first", steps=4), write=quiet)
    assert first.model_dir is not None
    config = smoke(tmp_path / "wide", steps=3, distribution="wide", init_from=str(first.model_dir))
    continued = train(config, write=quiet)
    assert continued.model_dir is not None and len(continued.losses) == 3
    # It starts from the given weights (not a fresh init) and keeps the given tokenizer.
    start = load_model(first.model_dir, "cpu", torch.float32)
    tokenizer = Tokenizer.from_file(str(first.model_dir / "tokenizer.json"))
    assert (continued.model_dir / "tokenizer.json").read_text() == (first.model_dir / "tokenizer.json").read_text()
    pad = special_token_ids(tokenizer)["<|pad|>"]
    batch = [encode_problem(tokenizer, p) for p in train_batch(config.data_seed, 0, config.batch_size, "wide")]
    inputs, targets = collate(batch, pad)
    cpu = torch.device("cpu")
    no_grad, grad = sample_recurrence(
        config.mean_recurrence, config.mean_backprop_depth, _step_generator(config.seed, 0, 1, cpu)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = recurrent_loss(start, inputs, targets, no_grad, grad, _step_generator(config.seed, 0, 2, cpu))
    assert continued.losses[0] == pytest.approx(float(expected), rel=1e-4)


def test_init_from_must_match_the_architecture(tmp_path: Path) -> None:
    first = train(smoke(tmp_path / "first", steps=2), write=quiet)
    with pytest.raises(TrainingError, match="has another architecture: n_embd: model 32, config 64"):
        train(smoke(tmp_path / "other", n_embd=64, init_from=str(first.model_dir)), write=quiet)
    with pytest.raises(TrainingError, match=r"init_from must be a model folder with a config\.json"):
        smoke(tmp_path / "x", init_from=str(tmp_path))
    with pytest.raises(TrainingError, match="distribution must be one of"):
        smoke(tmp_path / "x", distribution="broad")


def test_length_buckets_give_the_loss_and_gradient_of_one_batch(tokenizer: Tokenizer) -> None:
    model = RecurrentDepthModel(smoke(Path("x")).model_config(tokenizer))
    model.init_weights(torch.Generator().manual_seed(0))
    # A zero initial state makes the result independent of how the random draws split across micro-batches.
    model.initial_state = lambda like, *args: torch.zeros_like(like)  # type: ignore[method-assign]
    pad = special_token_ids(tokenizer)["<|pad|>"]
    examples = [encode_problem(tokenizer, p) for p in train_batch(0, 3, 12, "wide")]
    buckets = length_buckets(examples, 3)
    assert [len(b) for b in buckets] == [4, 4, 4]
    lengths = [len(p) + len(a) for bucket in buckets for p, a in bucket]
    assert lengths == sorted(lengths)
    padded = sum(collate(b, pad)[0].numel() for b in buckets)
    assert padded < collate(examples, pad)[0].numel()

    def run(batches: list[list[tuple[list[int], list[int]]]]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss_of = partial(recurrent_loss, model, no_grad_steps=1, grad_steps=2, generator=torch.Generator())
        loss = accumulate_gradients([collate(b, pad) for b in batches], loss_of, bf16=False)
        return loss, [p.grad.clone() for p in model.parameters()]

    whole_loss, whole_grads = run([examples])
    bucket_loss, bucket_grads = run(buckets)
    assert bucket_loss == pytest.approx(whole_loss, rel=1e-5)
    for whole, bucketed in zip(whole_grads, bucket_grads, strict=True):
        torch.testing.assert_close(bucketed, whole, rtol=1e-4, atol=1e-6)


def test_precision_auto_resolves_to_what_the_hardware_runs() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")


def test_init_from_may_train_at_another_depth_and_keeps_its_own(tmp_path: Path) -> None:
    first = train(smoke(tmp_path / "first", steps=2), write=quiet)
    assert first.model_dir is not None
    log: list[str] = []
    config = smoke(
        tmp_path / "deeper", steps=4, mean_recurrence=2, init_from=str(first.model_dir), length_buckets=2,
        eval_every=4, eval_problems=2, snapshot_every=2, precision="auto",
    )  # fmt: skip
    summary = train(config, write=log.append)
    assert summary.model_dir is not None
    # The export runs at the depth the model was made for (the smoke preset's 4), not the training depth.
    assert load_model(summary.model_dir, "cpu", torch.float32).config.mean_recurrence == 4
    assert any("greedy at r=4" in line for line in log)
    assert sorted(p.name for p in (tmp_path / "deeper" / "snapshots").iterdir()) == ["step-2", "step-4"]
    # Precision is a runtime setting: a resumed run may change it.
    resumed = train(replace(config, steps=4, precision="fp32"), resume=True, write=quiet)
    assert resumed.start_step == 4
