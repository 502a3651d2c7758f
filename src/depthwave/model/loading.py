"""Loading a checkpoint in the official Hugging Face layout: `config.json` + `model.safetensors` (or a sharded
safetensors index), from a local folder or, when the folder is not local, from the Hugging Face hub."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from depthwave.errors import CheckpointError, DepthwaveError
from depthwave.hub import quiet_hub
from depthwave.model.config import HuginnConfig
from depthwave.model.model import RecurrentDepthModel
from depthwave.model.ouro import checkpoint_shapes, from_checkpoint, to_checkpoint

# The RoPE table the reference stores as a persistent buffer; depthwave recomputes it in fp32.
IGNORED_KEYS = frozenset({"freqs_cis"})
TIED_KEYS = ("transformer.wte.weight", "lm_head.weight")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The small model trained with the Huginn recipe that ships inside the package (see its MODEL_CARD.md).
BUILTIN_NAME = "builtin"
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "assets" / "builtin"


def resolve_model_dir(path_or_id: str | Path, revision: str | None = None) -> Path:
    """ "builtin", a local folder as is, or else a hub id, downloaded (or found in the local hub cache)."""
    if str(path_or_id) == BUILTIN_NAME and not Path(BUILTIN_NAME).is_dir():
        if not (BUILTIN_DIR / "model.safetensors").is_file():
            raise CheckpointError(f"the built-in model is missing from this installation ({BUILTIN_DIR})")
        return BUILTIN_DIR
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists():
        raise CheckpointError(f"{text} is a file; expected a model folder with config.json and model.safetensors")
    if not _HUB_ID.match(text):
        raise CheckpointError(f"no model folder at {text} (and it is not a Hugging Face hub id like 'owner/name')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{text} is not a local folder and huggingface_hub is not importable: {exc}") from None
    try:
        with quiet_hub():
            return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{text} is not a local folder and could not be fetched from the Hugging Face hub: the hub is "
            "unreachable (offline) and the model is not in the local hub cache; pass a local folder instead"
        ) from None
    except Exception as exc:  # network errors, unknown repo, gated repo, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"could not fetch {text} from the Hugging Face hub: {reason}") from None


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file that holds it."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        with _open_safetensors(single) as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = {key: folder / name for key, name in weight_map.items()}
        for missing in sorted({p for p in files.values() if not p.is_file()}):
            raise CheckpointError(f"{index} names shard {missing.name}, which is not in {folder}")
        return files
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


@contextmanager
def _open_safetensors(path: Path, device: torch.device | str = "cpu") -> Iterator[Any]:
    """safe_open, with a damaged file (truncated, corrupted, not safetensors) reported as a CheckpointError that
    names it."""
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            yield f
    except DepthwaveError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError, an OSError or a RuntimeError
        raise CheckpointError(
            f"cannot read {path}: the file is truncated, corrupted or not safetensors ({exc})"
        ) from None


def _finite(tensor: torch.Tensor, dtype: torch.dtype, key: str, path: Path) -> torch.Tensor:
    """The tensor in `dtype`, refused when it holds NaN or inf, or when the conversion overflows (a bf16 or fp32
    weight beyond float16's range): a model that would only ever print garbage is not loaded."""
    converted = tensor.to(dtype)
    if bool(torch.isfinite(converted).all()):
        return converted
    if not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"tensor {key} in {path} holds NaN or inf values; the checkpoint is damaged")
    largest = float(tensor.abs().max())
    raise CheckpointError(
        f"tensor {key} in {path} overflows {str(dtype).removeprefix('torch.')} (largest magnitude {largest:.4g}); "
        "load the model as bfloat16 (dtype='bfloat16') or float32"
    )


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with _open_safetensors(path) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if files.get(key) == path:
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


_BLOCK_KEY = re.compile(r"^transformer\.(prelude|core_block|coda)\.\d+\.(.+)$")


def detect_block_type(keys: Iterable[str], source: Path) -> str:
    """The block type from the checkpoint's keys, since config.json does not say: `norm_3` means Huginn's sandwich
    block, `attn.q_norm` the OLMo-2 block, and two norms per block without either the Llama block."""
    keys = list(keys)
    suffixes = {m.group(2) for m in map(_BLOCK_KEY.match, keys) if m}
    if not suffixes:
        plain = any(k.startswith(("model.layers.", "layers.")) for k in keys)
        hint = " (it looks like a plain transformers checkpoint, which has no recurrence)" if plain else ""
        raise CheckpointError(
            f"cannot tell the model family of {source}: it has no transformer.prelude/core_block/coda.N.* block "
            f"weights{hint}"
        )
    sandwich, olmo = "norm_3.weight" in suffixes, "attn.q_norm.weight" in suffixes
    if sandwich and olmo:
        raise CheckpointError(
            f"cannot tell the model family of {source}: its blocks have both norm_3 (Huginn's sandwich block) and "
            "attn.q_norm (the OLMo-2 block) weights"
        )
    if sandwich:
        return "sandwich"
    if olmo:
        return "olmo2"
    if {"norm_1.weight", "norm_2.weight", "attn.Wqkv.weight"} <= suffixes:
        return "llama"
    raise CheckpointError(
        f"cannot tell the model family of {source}: its blocks have none of norm_3 (Huginn), attn.q_norm (OLMo-2) "
        f"or norm_1 + norm_2 + attn.Wqkv (Llama); block weights found: {sorted(suffixes)}"
    )


def _check_keys(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], tied: bool, source: Path
) -> None:
    problems: list[str] = []
    expected = dict(expected)
    if tied:
        # The tied matrix may be stored under either name, or both.
        shape = expected[TIED_KEYS[0]]
        for key in TIED_KEYS:
            if key not in found:
                expected.pop(key)
        if not any(k in found for k in TIED_KEYS):
            problems.append(f"missing: {TIED_KEYS[0]} (or {TIED_KEYS[1]}), expected shape {list(shape)}")
    for key, shape in expected.items():
        if key not in found:
            problems.append(f"missing: {key}, expected shape {list(shape)}")
        elif found[key] != shape:
            problems.append(f"wrong shape: {key}, expected {list(shape)}, found {list(found[key])}")
    for key in sorted(set(found) - set(expected) - IGNORED_KEYS):
        problems.append(f"unexpected: {key}, shape {list(found[key])}")
    if problems:
        lines = "\n  ".join(problems)
        raise CheckpointError(
            f"checkpoint {source} does not match its config.json ({len(problems)} problems):\n  {lines}"
        )


def load_model(
    path_or_id: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
) -> RecurrentDepthModel:
    """Load a recurrent-depth checkpoint (Huginn, or a retrofitted Llama / OLMo-2: the keys tell; or Ouro, named by
    its config.json) in eval mode.

    `dtype` defaults to the config's `torch_dtype`. Tensors are read one at a time from the memory-mapped files
    and converted straight into the model, so no second full copy of the weights is made."""
    folder = resolve_model_dir(path_or_id, revision)
    config = HuginnConfig.from_json(folder / "config.json")
    target_dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    files = checkpoint_files(folder)
    found = _shapes(files)
    if not config.looped_stack:  # Ouro's config.json names its family; the others' keys tell
        config = replace(config, block_type=detect_block_type(found, folder))
    with torch.device("meta"):
        model = RecurrentDepthModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with _reader(files, device, target_dtype) as read:
        if config.looped_stack:
            _check_keys(checkpoint_shapes(config, shapes), found, False, folder)
            state = from_checkpoint(config, read)
        else:
            _check_keys(shapes, found, config.tie_embeddings, folder)
            state = {key: read(key) for key in sorted(found.keys() - IGNORED_KEYS)}
    if config.tie_embeddings:
        _merge_tied(state)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
    model.reset_rope(device)
    return model.eval().requires_grad_(False)


@contextmanager
def _reader(
    files: dict[str, Path], device: torch.device, dtype: torch.dtype
) -> Iterator[Callable[[str], torch.Tensor]]:
    """`read(key)`: one tensor from its memory-mapped file, converted to `dtype` and checked finite; each file is
    opened once."""
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(key: str) -> torch.Tensor:
            path = files[key]
            if path not in handles:
                handles[path] = stack.enter_context(_open_safetensors(path, device))
            return _finite(handles[path].get_tensor(key), dtype, key, path)

        yield read


def resolve_dtype(dtype: torch.dtype | str | None, config: HuginnConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype in (None, "auto") else dtype
    if name not in DTYPES:
        raise CheckpointError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[name]


def _merge_tied(state: dict[str, torch.Tensor]) -> None:
    embedding, head = (state.pop(k, None) for k in TIED_KEYS)
    if embedding is not None and head is not None and not torch.equal(embedding, head):
        raise CheckpointError(
            "config.json ties the embeddings (tie_embeddings) but the checkpoint's lm_head.weight differs "
            "from transformer.wte.weight"
        )
    state[TIED_KEYS[0]] = embedding if embedding is not None else head  # type: ignore[assignment]


def save_model(model: RecurrentDepthModel, folder: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` in the official layout (tied embedding stored once)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.looped_stack:
        state = to_checkpoint(config, state)
    elif config.tie_embeddings:
        state.pop(TIED_KEYS[1])
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
