"""The tuned lens (Belrose et al. 2023): ``"{l}_pre"`` reads as ``ln_final(h + W_l h + b_l) @ W_U + b_U``.

Two folder formats: ours (a JSON config naming the SHA-256 of a safetensors file) and the ``tuned-lens``
package's (``config.json`` + ``params.pt``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from jaxtyping import Float

from tl_latentspaces.checks import warn_user
from tl_latentspaces.files import json_safe, read_torch_dict, sha256_hex, torch_bytes, write_into_folder
from tl_latentspaces.model import ModelAccess, ModelIdentity, pre_layer
from tl_latentspaces.readout import tensor_key

__all__ = ["ModelIdentity", "TunedLens", "translate_rows", "CONFIG_FILE", "PARAMS_FILE", "PKG_CONFIG_FILE",
           "PKG_PARAMS_FILE"]

PathLike = Union[str, os.PathLike]

#: Our folder format: a JSON config and a safetensors file.
CONFIG_FILE = "tuned_lens.json"
PARAMS_FILE = "tuned_lens.safetensors"
_FORMAT = "tl_latentspaces.tuned_lens"
_FORMAT_VERSION = 1

#: The ``tuned-lens`` package's folder format (``TunedLens.save`` in tuned-lens 0.2).
PKG_CONFIG_FILE = "config.json"
PKG_PARAMS_FILE = "params.pt"
_PKG_LENS_TYPE = "linear_tuned_lens"


def translate_rows(x: Float[torch.Tensor, "n d_model"], W: Float[torch.Tensor, "d_model d_model"],
                   b: Float[torch.Tensor, " d_model"]) -> Float[torch.Tensor, "n d_model"]:
    """One translator applied to rows: ``x + x @ W.T + b`` (the fit and the lens share this formula)."""
    return x + torch.addmm(b, x, W.T)


class TunedLens(torch.nn.Module):
    """Affine translators ``h -> h + W_l h + b_l``, one per layer, read through the logit lens.

    Zero at the start, so a fresh lens *is* the logit lens; it refuses a model other than its own. It is a
    :class:`~tl_latentspaces.Lens` and TransformerLens 4.3's ``logit_lens(..., lens=lens)`` callable.

    Args:
        identity: The model this lens is for (see :meth:`for_model`).
        weight: ``[n_layers, d_model, d_model]`` (``nn.Linear`` convention: ``h + h @ W_l.T + b_l``); zeros if
            None. Kept as a float32 ``nn.Parameter``, like ``bias``.
        bias: ``[n_layers, d_model]``; zeros if None.
        info: JSON-serialisable notes on how the lens was made (fit settings, losses); saved with the lens.

    Example:
        >>> lens = TunedLens.for_model(model)  # doctest: +SKIP
        >>> lens.save("smollm2-tuned")  # doctest: +SKIP
        >>> same = TunedLens.load("smollm2-tuned", model)  # doctest: +SKIP
    """

    name = "tuned"

    def __init__(self, identity: ModelIdentity, *,
                 weight: Optional[Float[torch.Tensor, "layer d_model d_model"]] = None,
                 bias: Optional[Float[torch.Tensor, "layer d_model"]] = None, info: Optional[dict] = None):
        super().__init__()
        if not isinstance(identity, ModelIdentity):
            raise TypeError(f"identity must be a ModelIdentity, got {type(identity).__name__}. "
                            "Use TunedLens.for_model(model) to make a lens for a model.")
        L, d = identity.n_layers, identity.d_model
        weight = torch.zeros(L, d, d) if weight is None else weight
        bias = torch.zeros(L, d) if bias is None else bias
        _check_param("weight", weight, (L, d, d))
        _check_param("bias", bias, (L, d))
        self.identity = identity
        self.weight = torch.nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = torch.nn.Parameter(bias.detach().to(torch.float32).clone())
        if info is not None and not isinstance(info, dict):
            raise TypeError(f"info must be a dict of JSON-serialisable notes, got {type(info).__name__}.")
        self.info = dict(info or {})
        self._checked: Optional[tuple] = None

    @classmethod
    def for_model(cls, model: Any) -> "TunedLens":
        """A zero-initialised lens for ``model``: exactly the logit lens until it is fitted."""
        return cls(ModelIdentity.of(model, weights=False))

    @property
    def n_layers(self) -> int:
        return self.identity.n_layers

    @property
    def d_model(self) -> int:
        return self.identity.d_model

    def extra_repr(self) -> str:
        return f"model={self.identity.name!r}, n_layers={self.n_layers}, d_model={self.d_model}"

    def transform_hidden(self, h: Float[torch.Tensor, "... d_model"], index: int) -> Float[torch.Tensor, "... d_model"]:
        """``h + h @ W.T + b`` in float32 for stack index ``index``: ``l`` for ``"{l}_pre"``, ``n_layers`` (or -1)
        for ``"final_post"``, which is returned unchanged. ``h`` may have any float dtype and leading shape."""
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = int(index.item())
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError(f"the stack index must be an int, got {index!r}.")
        is_final = index in (self.n_layers, -1)
        if not is_final and not 0 <= index < self.n_layers:
            raise ValueError(
                f"stack index {index} is out of range: this tuned lens has translators for entries "
                f"0..{self.n_layers - 1} (the '{{l}}_pre' residuals) and reads entry {self.n_layers} ('final_post') "
                "unchanged. resid_mid entries (incl_mid=True) have no translator; read them with incl_mid=False."
            )
        x = self._float32(h)
        if is_final:
            return x
        if not (torch.isfinite(self.weight[index]).all() and torch.isfinite(self.bias[index]).all()):
            self.check_finite("read")
        return self._translated(x.reshape(-1, self.d_model), index).reshape(x.shape)

    def _float32(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"residual vectors must have d_model={self.d_model} features, got shape {tuple(x.shape)}.")
        return x.to(torch.float32)

    def _translated(self, x: Float[torch.Tensor, "n d_model"], layer: int) -> Float[torch.Tensor, "n d_model"]:
        return translate_rows(x, self.weight[layer].to(x.device, torch.float32),
                              self.bias[layer].to(x.device, torch.float32))

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        """The :class:`~tl_latentspaces.Lens` protocol: ``x + x @ W.T + b`` in float32 for ``"{l}_pre"``,
        ``x`` for ``"final_post"``; ``ValueError`` for any other label."""
        layer = pre_layer(label, self.n_layers)
        if layer is None and label != "final_post":
            raise ValueError(
                f"the tuned lens has no translator for stack entry {label!r}: it reads the "
                f"'{{l}}_pre' entries (l < {self.n_layers}) and 'final_post'. Read it with incl_mid=False."
            )
        x = self._float32(x)
        return x if layer is None else self._translated(x, layer)

    def forward(self, entry: torch.Tensor, index: int) -> torch.Tensor:
        """The TransformerLens ``lens(entry, index)`` callable (:meth:`transform_hidden` in ``entry``'s dtype)."""
        return self.transform_hidden(entry, index).to(entry.dtype)

    def check_model(self, model: Any, *, check_unembedding: bool = True, what: str = "this tuned lens") -> ModelAccess:
        """Raise ``ValueError`` naming every mismatch between this lens and ``model``."""
        access = ModelAccess.of(model)
        # Hashing W_U takes a fraction of a second; skip it when this very tensor was checked before.
        b_U = getattr(access.model, "b_U", None)
        key = (id(access.model), tensor_key(access.W_U), tensor_key(b_U) if isinstance(b_U, torch.Tensor) else None,
               check_unembedding)
        if key == self._checked:
            return access
        model_id = ModelIdentity.of(access, weights=False)
        problems = self.identity.mismatches(model_id, check_unembedding=check_unembedding)
        if problems:
            raise ValueError(
                f"{what} was fitted for {self.identity.name!r} and does not fit model {model_id.name!r}: "
                + "; ".join(problems)
                + ". Fit a lens for this model with tl_latentspaces.fit_tuned_lens(model, corpus), or load the model "
                "the lens was made for. (A model in compatibility mode has a different W_U than the same model raw; "
                "pass check_unembedding=False only if you know the translators still apply.)"
            )
        self._checked = key
        return access

    def check_finite(self, action: str = "read") -> None:
        """Raise ``ValueError`` naming the layers whose translators hold NaN or inf (``action``: for the message)."""
        bad_w, bad_b = _nonfinite_layers(self.weight), _nonfinite_layers(self.bias)
        if bad_w or bad_b:
            layers = sorted(set(bad_w) | set(bad_b))
            parts = [f"weight of layer(s) {bad_w}"] * bool(bad_w) + [f"bias of layer(s) {bad_b}"] * bool(bad_b)
            raise ValueError(
                f"cannot {action} this tuned lens: the translator(s) of layer(s) {layers} hold NaN or inf values "
                f"({', '.join(parts)}), which would make every readout of those layers NaN. Refit the lens "
                "(tl_latentspaces.fit_tuned_lens) or load a saved copy (TunedLens.load); if you edited lens.weight "
                "or lens.bias, check what was written."
            )

    def save(self, path: PathLike) -> Path:
        """Write the lens to the folder ``path`` (``tuned_lens.json`` + ``tuned_lens.safetensors``); returns it.

        Each file is replaced atomically. A non-empty non-lens folder, or NaN/inf translators, are refused.
        """
        self.check_finite("save")
        return _write_folder(self, Path(path))

    @classmethod
    def load(cls, path: PathLike, model: Any, *, check_unembedding: bool = True,
             device: Union[str, torch.device, None] = None) -> "TunedLens":
        """Load a lens saved by :meth:`save`, refusing one fitted for another model than ``model``.

        ``check_unembedding=False`` skips the ``W_U`` hash (compatibility mode changes ``W_U``). ``device``
        defaults to the model's.

        Raises:
            FileNotFoundError: If the folder or its files are missing.
            ValueError: On a malformed file, missing or extra layers, or a model mismatch.
        """
        identity, tensors, info = _read_folder(Path(path))
        lens = cls(identity, weight=tensors["weight"], bias=tensors["bias"], info=info)
        access = lens.check_model(model, check_unembedding=check_unembedding, what=f"the lens in {str(Path(path))!r}")
        return lens.to(device if device is not None else access.device)

    def save_tuned_lens_format(self, path: PathLike, model: Any = None) -> Path:
        """Write the ``tuned-lens`` package's folder format (``config.json`` + ``params.pt``); returns the folder.

        ``model``, optional, records the package's ``unembed_hash`` of ``W_U`` (the package warns without it).
        """
        self.check_finite("save")
        unembed_hash = _package_unembed_hash(self.check_model(model)) if model is not None else None
        return _write_package_folder(self, Path(path), unembed_hash)

    @classmethod
    def load_tuned_lens_format(cls, path: PathLike, model: Any, *, check_unembedding: bool = True,
                               device: Union[str, torch.device, None] = None) -> "TunedLens":
        """Import a lens folder in the ``tuned-lens`` package's format (``config.json`` + ``params.pt``).

        ``params.pt`` is read with ``weights_only=True``; the ``unembed_hash``, if any, is checked unless
        ``check_unembedding`` is False.

        Raises:
            FileNotFoundError: If the folder or its files are missing.
            ValueError: On unsafe or malformed ``params.pt``, missing or extra layers, an unsupported
                ``lens_type``, or a model mismatch.
        """
        access, weight, bias, config = _read_package_folder(Path(path), model, check_unembedding)
        info = {"imported_from": "tuned-lens package format", "package_config": config}
        lens = cls(ModelIdentity.of(access, weights=False), weight=weight, bias=bias, info=json_safe(info))
        return lens.to(device if device is not None else access.device)


# ---------------------------------------------------------------------- our folder format
def _write_folder(lens: TunedLens, folder: Path) -> Path:
    config = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "model": asdict(lens.identity),
              "translator": "h + h @ weight[l].T + bias[l], l = stack index of '{l}_pre'; final_post unchanged",
              "info": lens.info}
    tensors = {k: getattr(lens, k).detach().to("cpu", torch.float32).contiguous() for k in ("weight", "bias")}
    params = safetensors.torch.save(tensors, metadata={"format": _FORMAT})
    config["params_sha256"] = sha256_hex(params)
    files = [(PARAMS_FILE, params), (CONFIG_FILE, _config_bytes(config))]
    previous = _previous_config(folder)
    if previous is not None:
        files.insert(0, (CONFIG_FILE, _config_bytes({**config, "previous": previous})))
    return write_into_folder(folder, files, own_marker=CONFIG_FILE, what="lens folder")


def _read_folder(folder: Path) -> tuple[ModelIdentity, dict, dict]:
    """The identity, tensors and info of the lens saved in ``folder``, validated."""
    cfg_path, params_path = folder / CONFIG_FILE, folder / PARAMS_FILE
    if not cfg_path.is_file() or not params_path.is_file():
        if (folder / PKG_CONFIG_FILE).is_file() and (folder / PKG_PARAMS_FILE).is_file():
            raise ValueError(f"{str(folder)!r} holds a lens in the tuned-lens package's format ({PKG_CONFIG_FILE} + "
                             f"{PKG_PARAMS_FILE}). Load it with TunedLens.load_tuned_lens_format(path, model).")
        raise FileNotFoundError(f"{str(folder)!r} is not a saved tuned lens: it needs {CONFIG_FILE} and {PARAMS_FILE} "
                                "(written by TunedLens.save).")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {cfg_path}: {err}. The lens folder is damaged; save it again.") from err
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{cfg_path} is not a tl_latentspaces tuned lens config (format {found!r}, "
                         f"expected {_FORMAT!r}).")
    if config.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{cfg_path} has format_version {config.get('format_version')!r}; this version of "
                         f"tl_latentspaces reads version {_FORMAT_VERSION}. Upgrade tl_latentspaces or refit.")
    try:
        data = params_path.read_bytes()
        tensors = safetensors.torch.load(data)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {params_path}: {err}. The lens folder is damaged; save it again.") from err
    digest, recorded = sha256_hex(data), config.get("params_sha256")
    matching = _config_for(config, digest)
    if matching is not None and matching is not config:
        warn_user(
            f"{cfg_path} records a save that did not finish: {params_path.name} still holds the previous lens, "
            "which was loaded. Save the lens again to complete it.")
        config = matching
    try:
        identity = ModelIdentity(**config["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{cfg_path} has no valid 'model' section: {err}.") from err
    extra = sorted(set(tensors) - {"weight", "bias"})
    missing = sorted({"weight", "bias"} - set(tensors))
    if extra or missing:
        raise ValueError(f"{params_path} must hold exactly the tensors ['bias', 'weight']; missing {missing}, "
                         f"extra {extra}. It was not written by TunedLens.save; save the lens again.")
    _check_layers(tensors["weight"], tensors["bias"], identity, str(params_path))
    if matching is None:
        raise ValueError(
            f"{params_path} (sha256 {digest[:16]}...) is not the parameter file {cfg_path.name} names (sha256 "
            f"{str(recorded)[:16]}...): the two files of this lens folder do not belong together (one was copied "
            "from another lens or edited, or a save was cut off). Save the lens again, or copy both files from the "
            "same lens folder."
        )
    if not isinstance(config.get("info", {}), dict):
        raise ValueError(f"{cfg_path}: 'info' must be a JSON object, got {type(config['info']).__name__}. The lens "
                         "folder is damaged; save it again.")
    return identity, tensors, config.get("info") or {}


def _config_bytes(config: dict) -> bytes:
    try:
        return json.dumps(config, indent=2, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as err:
        raise ValueError(f"lens.info must be JSON-serialisable with finite numbers: {err}") from err


def _previous_config(folder: Path) -> Optional[dict]:
    """The config of the lens in ``folder`` now (after an interrupted save, its ``previous`` section), or None."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        digest = sha256_hex((folder / PARAMS_FILE).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != _FORMAT:
        return None
    return _config_for(config, digest)


def _config_for(config: dict, digest: str) -> Optional[dict]:
    """Of ``config`` and its ``previous`` section (the lens an unfinished save was replacing, taken out of
    ``config``), the one whose ``params_sha256`` is ``digest`` or absent (written before hashes were recorded)."""
    previous = config.pop("previous", None)
    for candidate in (config, previous):
        if isinstance(candidate, dict) and candidate.get("params_sha256") in (None, digest):
            return candidate
    return None


# ---------------------------------------------------------------------- the tuned-lens package's format
def _write_package_folder(lens: TunedLens, folder: Path, unembed_hash: Optional[str]) -> Path:
    config = {"base_model_name_or_path": lens.identity.name, "d_model": lens.d_model,
              "num_hidden_layers": lens.n_layers, "bias": True, "base_model_revision": None,
              "unembed_hash": unembed_hash, "lens_type": _PKG_LENS_TYPE}
    # torch_bytes detaches each tensor and saves a layer's view without the rest of the stacked parameter
    state = {f"{layer}.{kind}": getattr(lens, kind)[layer].to("cpu", torch.float32)
             for layer in range(lens.n_layers) for kind in ("weight", "bias")}
    # The parameters first: the package's config names no hash, and its sizes are the same for the old and
    # the new lens of one model.
    files = [(PKG_PARAMS_FILE, torch_bytes(state)), (PKG_CONFIG_FILE, json.dumps(config).encode("utf-8"))]
    return write_into_folder(folder, files, own_marker=PKG_PARAMS_FILE, what="lens folder")


def _read_package_folder(folder: Path, model: Any, check_unembedding: bool) -> tuple[ModelAccess, Any, Any, dict]:
    """The model's access, the ``[L, d, d]`` weight, ``[L, d]`` bias and config of a tuned-lens folder, validated."""
    cfg_path, params_path = folder / PKG_CONFIG_FILE, folder / PKG_PARAMS_FILE
    for p in (cfg_path, params_path):
        if not p.is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a tuned-lens package folder: {p.name} is missing "
                                    f"(it needs {PKG_CONFIG_FILE} and {PKG_PARAMS_FILE}).")
    access = ModelAccess.of(model)
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {cfg_path} as JSON: {err}.") from err
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}.")
    lens_type = config.get("lens_type", _PKG_LENS_TYPE)
    if lens_type != _PKG_LENS_TYPE:
        raise ValueError(f"{cfg_path} has lens_type {lens_type!r}; only {_PKG_LENS_TYPE!r} (affine translators) "
                         "can be imported.")
    problems = []
    for key, ours in (("num_hidden_layers", access.n_layers), ("d_model", access.d_model)):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{cfg_path} needs an int {key!r}, got {value!r}.")
        if value != ours:
            problems.append(f"{key}: lens {value}, model {ours}")
    pkg_hash = config.get("unembed_hash")
    model_hash = _package_unembed_hash(access) if (check_unembedding and pkg_hash) else None
    if model_hash is not None and model_hash != pkg_hash:
        problems.append(f"unembed_hash (tuned-lens hash of W_U): lens {pkg_hash}, model {model_hash}")
    if problems:
        raise ValueError(
            f"the tuned-lens folder {str(folder)!r} was made for {config.get('base_model_name_or_path')!r} and does "
            f"not fit model {access.name!r}: " + "; ".join(problems)
            + ". Load the lens made for this model, or fit one with tl_latentspaces.fit_tuned_lens."
        )
    state = read_torch_dict(params_path, holds="named tensors '0.weight', '0.bias', ...", fix="Re-save the translators "
                            "from trusted code with torch.save(lens.layer_translators.state_dict(), 'params.pt').")
    if not all(isinstance(k, str) for k in state):
        raise ValueError(f"{params_path} must hold a dict of named tensors ('0.weight', '0.bias', ...).")
    L, d = access.n_layers, access.d_model
    has_bias = bool(config.get("bias", True))
    expected = {f"{layer}.{kind}" for layer in range(L) for kind in (("weight", "bias") if has_bias else ("weight",))}
    missing = sorted(expected - set(state), key=_natural_key)
    extra = sorted(set(state) - expected, key=_natural_key)
    if missing or extra:
        raise ValueError(
            f"{params_path} does not hold one translator per layer of a {L}-layer model (keys '0.weight', '0.bias' "
            f"... '{L - 1}.weight', '{L - 1}.bias'): missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, extra "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}. Use the lens trained for this model (a lens for a "
            "deeper or shallower model does not transfer)."
        )
    weight = torch.stack([_tensor_entry(state, f"{layer}.weight", (d, d), params_path) for layer in range(L)])
    bias = (torch.stack([_tensor_entry(state, f"{layer}.bias", (d,), params_path) for layer in range(L)])
            if has_bias else torch.zeros(L, d))
    return access, weight, bias, config


def _package_unembed_hash(access: ModelAccess) -> str:
    """The ``tuned-lens`` package's ``Unembed.unembedding_hash()``: SHA-256 of ``np.array_str`` (precision 1) of
    the ``lm_head`` weight ``[d_vocab, d_model]``, i.e. ``W_U.T``."""
    w = access.W_U.detach().to("cpu", torch.float32).T.contiguous().numpy()
    return hashlib.sha256(str.encode(np.array_str(w, precision=1))).hexdigest()


def _natural_key(key: str) -> tuple:
    head, _, tail = key.partition(".")
    return (0, int(head), tail) if head.isdigit() else (1, 0, key)


def _tensor_entry(state: dict, key: str, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    t = state[key]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
        got = f"{type(t).__name__} {list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where}: {key!r} must be a float tensor of shape {list(shape)}, got {got}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: {key!r} holds NaN or inf values.")
    return t.to(torch.float32)


# ---------------------------------------------------------------------- checks
def _check_param(name: str, t: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a float tensor of shape {list(shape)}, got {type(t).__name__}.")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (layers, d_model...), got {list(t.shape)}.")
    bad = _nonfinite_layers(t)
    if bad:
        raise ValueError(f"{name} holds NaN or inf values in the translator(s) of layer(s) {bad}; a lens needs finite "
                         "translators. Refit the lens (tl_latentspaces.fit_tuned_lens) or use a good copy.")


def _nonfinite_layers(t: torch.Tensor) -> list[int]:
    """Indices along the first (layer) axis of ``t`` that hold a NaN or an infinity."""
    finite = torch.isfinite(t.detach())
    if finite.all():
        return []
    return [int(i) for i in torch.nonzero(~finite.reshape(t.shape[0], -1).all(-1)).flatten()]


def _check_layers(weight: torch.Tensor, bias: torch.Tensor, identity: ModelIdentity, where: str) -> None:
    L, d = identity.n_layers, identity.d_model
    if weight.ndim != 3 or weight.shape[0] != L or bias.ndim != 2 or bias.shape[0] != L:
        have = weight.shape[0] if weight.ndim >= 1 else 0
        raise ValueError(
            f"{where} holds {have} translators (weight {list(weight.shape)}, bias {list(bias.shape)}) but its config "
            f"says the model has {L} layers: layers are missing or extra. The file is damaged or was edited; save the "
            "lens again."
        )
    _check_param(f"{where}: weight", weight, (L, d, d))
    _check_param(f"{where}: bias", bias, (L, d))

