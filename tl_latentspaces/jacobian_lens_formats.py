"""The formats of a :class:`~tl_latentspaces.jacobian_lens.JacobianLens`.

* Our folder: ``jacobian_lens.json`` (format, model identity, labels, info) and
  ``jacobian_lens.safetensors`` (``{label: matrix}``), written atomically.
* TransformerLens 4.3's ``JacobianLens`` object and its ``.pt`` artifact (``J``, ``n_prompts``,
  ``source_layers``, ``d_model``, ``metadata``; or a fit checkpoint with ``jacobian_sum``), read with
  ``torch.load(weights_only=True)`` only. Its layer ``l`` is our ``"{l+1}_pre"``; our ``"0_pre"`` has no
  layer there. It reads only raw ``TransformerBridge`` activations: only a ``"bridge-raw"`` lens exports.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Union

import safetensors.torch
import torch
from safetensors import SafetensorError

from tl_latentspaces.files import json_safe, read_torch_dict, replace_folder_atomic, torch_bytes, write_bytes_atomic
from tl_latentspaces.model import ModelAccess, ModelIdentity

__all__ = ["CONFIG_FILE", "PARAMS_FILE", "write_lens_folder", "read_lens_folder", "is_transformer_lens_jacobian_lens",
           "matrices_from_transformer_lens", "transformer_lens_payload", "to_transformer_lens",
           "save_transformer_lens_file", "read_transformer_lens_file"]

PathLike = Union[str, os.PathLike]

#: Our folder format: a JSON config and a safetensors file of ``{label: matrix}``.
CONFIG_FILE = "jacobian_lens.json"
PARAMS_FILE = "jacobian_lens.safetensors"
_FORMAT = "tl_latentspaces.jacobian_lens"
_FORMAT_VERSION = 1


def write_lens_folder(lens: Any, path: Path) -> Path:
    """Our ``JacobianLens`` as a folder of JSON config and safetensors matrices, replaced atomically."""
    config = {
        "format": _FORMAT,
        "format_version": _FORMAT_VERSION,
        "name": lens.name,
        "model": asdict(lens.identity),
        "labels": lens.labels,
        "readout": "ln_final(h @ J[label].T) @ W_U + b_U; entries without a matrix read unchanged",
        "info": lens.info,
    }
    try:
        blob = json.dumps(config, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lens.info must be JSON-serialisable with finite numbers: {err}") from err

    def write(tmp: Path) -> None:
        safetensors.torch.save_file(lens.matrices, str(tmp / PARAMS_FILE), metadata={"format": _FORMAT})
        (tmp / CONFIG_FILE).write_text(blob)

    return replace_folder_atomic(path, write, own_marker=CONFIG_FILE, what="Jacobian lens folder")


def read_lens_folder(folder: Path) -> tuple[ModelIdentity, dict[str, torch.Tensor], dict]:
    """The identity, matrices and config :func:`write_lens_folder` wrote; errors name the damaged file."""
    cfg_path, params_path = folder / CONFIG_FILE, folder / PARAMS_FILE
    if not cfg_path.is_file() or not params_path.is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} is not a Jacobian lens folder: it needs {CONFIG_FILE} and {PARAMS_FILE} "
            "(written by JacobianLens.save). For a TransformerLens .pt artifact use "
            "JacobianLens.load_transformer_lens_format."
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8 text
        raise ValueError(f"{cfg_path} is not valid JSON ({err}); the folder is damaged.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} holds a JSON {type(config).__name__}, not the object a {_FORMAT} config "
                         "is; the folder is damaged: save the lens again.")
    if not isinstance(config.get("info", {}), dict):
        raise ValueError(f"{cfg_path}: 'info' must be a JSON object, got {type(config['info']).__name__}; the folder "
                         "is damaged: save the lens again.")
    if config.get("format") != _FORMAT:
        raise ValueError(f"{cfg_path} is not a {_FORMAT} config (format {config.get('format')!r}).")
    if config.get("format_version") != _FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} has format_version {config.get('format_version')!r}; this version reads "
            f"{_FORMAT_VERSION}. Upgrade tl_latentspaces or save the lens again."
        )
    try:
        identity = ModelIdentity(**config["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path} has no valid 'model' entry ({err}); the folder is damaged.") from err
    try:
        tensors = safetensors.torch.load_file(str(params_path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {params_path} as safetensors: {err}.") from err
    labels = list(config.get("labels", []))
    if sorted(tensors) != sorted(labels):
        raise ValueError(
            f"{params_path} holds matrices {sorted(tensors)} but its config lists {labels}: the "
            "folder is damaged or was edited; save the lens again."
        )
    return identity, tensors, config


def is_transformer_lens_jacobian_lens(obj: Any) -> bool:
    """Whether ``obj`` is a ``transformer_lens.tools.analysis.JacobianLens`` (TransformerLens >= 4.3)."""
    cls = type(obj)
    return (
        cls.__name__ == "JacobianLens"
        and cls.__module__.startswith("transformer_lens.")
        and isinstance(getattr(obj, "jacobians", None), dict)
        and callable(getattr(obj, "validate_model", None))
    )


def _tl_class(fix: str) -> Any:
    try:
        from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens
    except ImportError as err:
        raise ImportError("this needs TransformerLens >= 4.3 (transformer_lens.tools.analysis.JacobianLens); "
                          + fix) from err
    return TLJacobianLens


def matrices_from_transformer_lens(lens: Any, access: ModelAccess) -> tuple[dict[str, torch.Tensor], dict]:
    """``({"{l+1}_pre": J_l}, info)`` of a TransformerLens lens, after its own ``validate_model``; raises
    TypeError for another object, ValueError for a failed model check or a layer outside the model."""
    if not is_transformer_lens_jacobian_lens(lens):
        raise TypeError(
            f"expected a transformer_lens.tools.analysis.JacobianLens, got {type(lens).__module__}."
            f"{type(lens).__name__}."
        )
    lens.validate_model(access.model)  # TransformerLens's check: raw bridge, same model
    L = access.n_layers
    matrices = {}
    for layer, matrix in lens.jacobians.items():
        if not 0 <= int(layer) < L - 1:
            raise ValueError(
                f"the TransformerLens lens has a matrix for layer {layer}, outside 0..{L - 2} of this {L}-layer model."
            )
        matrices[f"{int(layer) + 1}_pre"] = matrix
    info = {
        "converted_from": "transformer_lens.tools.analysis.JacobianLens",
        "n_prompts": int(getattr(lens, "n_prompts", 0)),
        "model_kind": "bridge-raw",
        "transformer_lens_metadata": json_safe(dict(getattr(lens, "metadata", {}) or {})),
    }
    return matrices, info


def transformer_lens_payload(lens: Any) -> tuple[dict[int, torch.Tensor], dict]:
    """``({layer: J}, metadata)`` of our ``JacobianLens`` for TransformerLens; refuses another residual basis."""
    kind = lens.info.get("model_kind")
    if kind != "bridge-raw":
        raise ValueError(
            f"this lens was fitted on a {kind or 'model of unknown kind'}; TransformerLens's "
            "JacobianLens reads only raw TransformerBridge activations (a HookedTransformer or a "
            "compatibility-mode bridge speaks another residual basis). Fit on a freshly booted "
            "raw TransformerBridge to export."
        )
    jac = {int(label[:-4]) - 1: m for label, m in lens.matrices.items() if label != "0_pre"}
    if not jac:
        raise ValueError("this lens has no matrix TransformerLens can hold (only 0_pre); nothing to export.")
    meta = {"model_name": lens.identity.name, "target_layer": lens.n_layers - 1, "converted_from": _FORMAT}
    return jac, meta


def to_transformer_lens(lens: Any) -> Any:
    """Our ``JacobianLens`` as a ``transformer_lens.tools.analysis.JacobianLens`` (``"0_pre"`` left out)."""
    TLJacobianLens = _tl_class("save_transformer_lens_format writes its artifact format without it.")
    jac, meta = transformer_lens_payload(lens)
    return TLJacobianLens(jac, n_prompts=int(lens.info.get("n_prompts", 0)), d_model=lens.d_model, metadata=meta)


def save_transformer_lens_file(lens: Any, path: PathLike, dtype: torch.dtype) -> Path:
    """Write TransformerLens's ``.pt`` artifact of our ``JacobianLens`` atomically, matrices in ``dtype``."""
    jac, meta = transformer_lens_payload(lens)
    payload = {
        "J": {layer: m.to(dtype) for layer, m in jac.items()},
        "n_prompts": int(lens.info.get("n_prompts", 0)),
        "source_layers": sorted(jac),
        "d_model": lens.d_model,
        "metadata": meta,
    }
    return write_bytes_atomic(Path(path), torch_bytes(payload))


def read_transformer_lens_file(path: PathLike) -> Any:
    """A TransformerLens ``JacobianLens`` from its ``.pt`` artifact or fit checkpoint (``weights_only=True``)."""
    TLJacobianLens = _tl_class("install it to read and check J-lens artifacts.")
    payload = read_torch_dict(Path(path), holds="keys 'J', 'd_model', ...")
    if "J" in payload:
        jac = payload["J"]
        n_prompts = payload.get("n_prompts", 0)
    elif "jacobian_sum" in payload:
        n_prompts = payload.get("n_done", payload.get("n_prompts", 0))
        if not isinstance(n_prompts, int) or n_prompts <= 0:
            raise ValueError(f"{path} is a fit checkpoint with n_done={n_prompts!r}; a positive count is needed.")
        jac = {k: v / n_prompts for k, v in payload["jacobian_sum"].items() if isinstance(v, torch.Tensor)}
    else:
        raise ValueError(
            f"{path} is not a Jacobian lens artifact: it needs a 'J' key (artifact) or a "
            f"'jacobian_sum' key (fit checkpoint); it has {sorted(map(str, payload))[:8]}."
        )
    if not isinstance(jac, dict) or not jac or not all(isinstance(v, torch.Tensor) for v in jac.values()):
        raise ValueError(f"{path}: 'J' must be a non-empty {{layer: tensor}} dict.")
    d = next(iter(jac.values())).shape[-1]
    meta = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    if "target_layer" in payload and "target_layer" not in meta:
        meta = {**meta, "target_layer": payload["target_layer"]}
    bad = [k for k in jac if not (isinstance(k, int) or (isinstance(k, str) and k.isdigit()))]
    if bad:
        raise ValueError(f"{path}: the keys of 'J' must be layer numbers, got {bad[:4]}; the file is damaged.")
    return TLJacobianLens({int(k): v for k, v in jac.items()}, n_prompts=int(n_prompts or 0),
                          d_model=int(payload.get("d_model", d)), metadata=meta)
