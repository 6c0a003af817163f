"""Tuned lenses fitted once and kept on disk: the default model's, and one per other model.

Each is fitted on first use (``DEFAULT_FIT`` on the default corpus's training split) and loaded afterwards;
under ``torchrun`` every rank fits the same lens and only the main rank writes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from tl_latentspaces.checks import warn_user
from tl_latentspaces.corpus import default_corpus
from tl_latentspaces.default_model import DEFAULT_MODEL_NAME, default_cache_dir, load_default_model
from tl_latentspaces.distributed import current_context
from tl_latentspaces.fitting import fit_tuned_lens
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.translators import CONFIG_FILE, TunedLens

__all__ = ["DEFAULT_FIT", "default_lens_dir", "default_tuned_lens", "tuned_lens_for"]

#: Settings of the cached lenses; changing them changes the cache key.
DEFAULT_FIT = dict(max_tokens=16384, seq_len=128, seed=0, refine_tokens=6144)


def default_lens_dir(cache_dir: Union[str, Path, None] = None) -> Path:
    """Where :func:`default_tuned_lens` keeps the default model's lens."""
    return default_cache_dir(cache_dir) / f"{DEFAULT_MODEL_NAME}-tuned-lens"


def default_tuned_lens(model: Any = None, *, cache_dir: Union[str, Path, None] = None,
                       progress: bool = True) -> TunedLens:
    """The default model's tuned lens: fitted on first use (about a minute and a half on a CPU) and saved in
    :func:`default_lens_dir`, then loaded; a cached lens that does not match the model or was fitted with
    other settings is refitted. ``model`` defaults to ``load_default_model()``; another model raises
    ``ValueError``.

    Example:
        >>> lens = default_tuned_lens()  # doctest: +SKIP
        >>> tuned_lens(lens_model, "The Eiffel Tower is in the city of", lens)  # doctest: +SKIP
    """
    if model is None:
        model = load_default_model(cache_dir=cache_dir, progress=progress)
    access = ModelAccess.of(model)
    if access.n_layers != 30 or access.d_model != 576 or access.d_vocab != 49152:
        raise ValueError(f"default_tuned_lens is the lens of the default model ({DEFAULT_MODEL_NAME}: 30 layers, "
                         f"d_model 576, d_vocab 49152); got {access.name!r} with {access.n_layers} layers, "
                         f"d_model {access.d_model}, d_vocab {access.d_vocab}. Fit a lens for this model with "
                         "tl_latentspaces.fit_tuned_lens(model, corpus), or use tuned_lens_for(model).")
    return _cached_fit(access, default_lens_dir(cache_dir), DEFAULT_FIT, progress)


def tuned_lens_for(model: Any, *, cache_dir: Union[str, Path, None] = None, progress: bool = True) -> TunedLens:
    """A tuned lens for any ``model``: the cached one if there is one, else fitted and cached.

    The default model gets :func:`default_tuned_lens`; any other model a lens fitted with ``DEFAULT_FIT``
    (sequences no longer than its context), cached under
    ``default_cache_dir()/tuned-lenses/<name>-<unembedding fingerprint>``.
    """
    access = ModelAccess.of(model)
    if access.name == DEFAULT_MODEL_NAME:
        return default_tuned_lens(access, cache_dir=cache_dir, progress=progress)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in access.name)
    folder = default_cache_dir(cache_dir) / "tuned-lenses" / f"{safe}-{access.unembedding_fingerprint()}"
    settings = dict(DEFAULT_FIT, seq_len=min(DEFAULT_FIT["seq_len"], int(getattr(access.cfg, "n_ctx", 128))))
    return _cached_fit(access, folder, settings, progress)


def _cached_fit(access: ModelAccess, folder: Path, settings: dict, progress: bool) -> TunedLens:
    """The lens in ``folder`` if it fits ``access`` and was fitted with ``settings``; else a new one, saved there."""
    key = json.dumps(settings, sort_keys=True)
    if (folder / CONFIG_FILE).is_file():
        try:
            lens = TunedLens.load(folder, access)
            if lens.info.get("fit", {}).get("settings_key") == key:
                return lens
        except (ValueError, FileNotFoundError) as err:
            warn_user(f"refitting the tuned lens in {folder}: the cached one cannot be used ({err})")
    lens = fit_tuned_lens(access, default_corpus("train"), progress=progress, **settings)
    lens.info.setdefault("fit", {})["settings_key"] = key
    if current_context().is_main:  # under torchrun every rank fitted the same lens; one writes it
        lens.save(folder)
    return lens
