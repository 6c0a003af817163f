"""Hugging Face configs read right on every line, and Llama checkpoints as ``HookedTransformer``.

``transformers`` 5.x keeps the rotary base under ``rope_parameters``, which 4.57 ignores (it silently
uses 10,000), and TransformerLens 2.x gives a local Llama folder the default base too: every value is
read from ``config.json`` here, and one that would be read wrongly is refused with its field named.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

__all__ = ["HOOKED_ARCHITECTURES", "HOOKED_MAX_N_CTX", "check_hooked_config", "check_transformers_read",
           "hooked_from_hf", "quiet", "tokenizer_from_json"]

#: Architectures a local folder may hold for a ``HookedTransformer``: those whose every config field is checked.
HOOKED_ARCHITECTURES = ("LlamaForCausalLM",)

#: The ``HookedTransformer``'s context is capped here unless ``n_ctx`` is passed: TransformerLens
#: allocates an ``n_ctx x n_ctx`` mask per layer (SmolLM2's 8,192 would take 2 GB for 30 layers).
HOOKED_MAX_N_CTX = 2048

_HOOKED_FIX = ("this model cannot be converted to a HookedTransformer exactly; load it as a TransformerBridge "
               "(TransformerLens >= 3).")


@contextmanager
def quiet() -> Iterator[None]:
    """No warnings inside the block: transformers and TransformerLens warn about what is handled here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _refuse(source: str, field: str, detail: str, fix: str = _HOOKED_FIX) -> ValueError:
    return ValueError(f"{source}: {field} {detail}; {fix}")


def _rope_kind(block: Any) -> Any:
    """The rotary type a ``rope_parameters`` or ``rope_scaling`` entry names (None: the default)."""
    return block.get("rope_type", block.get("type")) if isinstance(block, dict) else block


def _rope_base(params: Any, theta: Any) -> Optional[float]:
    """The rotary base: ``rope_parameters["rope_theta"]`` (transformers 5), else ``rope_theta`` (transformers 4)."""
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return None if theta is None else float(theta)


def check_transformers_read(raw: dict, config: Any, source: str) -> None:
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
        kinds = [_rope_kind(b) for b in blocks if isinstance(b, dict)]
        kind = next((k for k in kinds if k not in (None, "default")), None)
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
            close = isinstance(got, float) and abs(got - float(raw[key])) <= 1e-12 * max(1.0, abs(got))
            if got != raw[key] and not close:
                raise _refuse(source, key, f"is {raw[key]!r} in config.json but is read as {got!r}", fix)


def check_hooked_config(raw: dict, source: str) -> float:
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
            raise _refuse(source, "rope_parameters", f"is {params!r}, not a mapping")
        if "rope_theta" not in params and any(isinstance(v, dict) for v in params.values()):
            raise _refuse(source, "rope_parameters", f"holds per-layer-type settings {sorted(params)}")
        if _rope_kind(params) not in (None, "default"):
            raise _refuse(source, "rope_parameters.rope_type",
                          f"is {_rope_kind(params)!r} (only 'default' rotary embeddings convert)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _refuse(source, "rope_parameters.partial_rotary_factor",
                          f"is {params['partial_rotary_factor']}")
        if "rope_theta" in params and theta is not None and float(theta) != float(params["rope_theta"]):
            raise _refuse(source, "rope_theta", f"is {theta} but rope_parameters.rope_theta is {params['rope_theta']}",
                          "fix config.json so the two agree.")
    if scaling is not None and _rope_kind(scaling) not in (None, "default"):
        raise _refuse(source, "rope_scaling", f"is {scaling!r} (only 'default' rotary embeddings convert)")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(source, "partial_rotary_factor", f"is {raw['partial_rotary_factor']}")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise _refuse(source, key, "is true, but TransformerLens's Llama conversion drops biases")
    missing = [k for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
                           "vocab_size", "max_position_embeddings") if not isinstance(raw.get(k), int)]
    if missing:
        raise _refuse(source, missing[0], f"is {raw.get(missing[0])!r}, not an integer", "fix config.json.")
    d_head = raw["hidden_size"] // raw["num_attention_heads"]
    if raw.get("head_dim") not in (None, d_head):
        raise _refuse(source, "head_dim",
                      f"is {raw['head_dim']}, not hidden_size / num_attention_heads = {d_head}")
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


def hooked_from_hf(raw: dict, name: str, source: str, hf: Any, tokenizer: Any, device: torch.device,
                   dtype: Optional[torch.dtype], n_ctx: Optional[int]) -> Any:
    """A ``HookedTransformer`` holding ``hf``'s own weights, nothing folded; its config checked against ``raw``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    theta = check_hooked_config(raw, source)
    n_heads = raw["num_attention_heads"]
    d_head = raw["hidden_size"] // n_heads
    n_kv = raw.get("num_key_value_heads") or n_heads
    n_ctx_full = raw["max_position_embeddings"]
    with quiet(), _tl_config_folder(raw) as tmp:
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
                raise _refuse(source, key,
                              f"is {want!r} in config.json, but TransformerLens read {field}={got!r}")
        fields["rotary_base"] = theta  # TransformerLens 2.x gives a local Llama folder the default 10,000
        fields["rotary_dim"] = d_head
        fields["model_name"] = name  # not the temporary folder TransformerLens read the config from
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int)
                                  or not 1 <= n_ctx <= n_ctx_full):
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


def tokenizer_from_json(folder: Path, *, strip_template: bool) -> Any:
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
