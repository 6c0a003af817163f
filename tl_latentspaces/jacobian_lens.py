"""The Jacobian lens (Gurnee et al. 2026): one corpus-averaged Jacobian per layer before the logit lens.

The residual ``h`` of stack entry ``"{l}_pre"`` (``blocks.{l}.hook_resid_pre``) reads as
``ln_final(J_l h) @ W_U + b_U``, where ``J_l`` is the ``d_model x d_model`` Jacobian of the last
block's output (``final_post``) with respect to that residual, averaged over a corpus:
    J_l = mean over prompts of  (1/|V|) sum_{t in V} sum_{t' in V, t' >= t}  d h_final[t'] / d h_l[t]

``V``, the valid positions, leaves out the first ``skip_first_positions`` (attention sinks with
atypical residuals) and the last. ``J_l = I`` is the logit lens; the final entry, and an entry without
a matrix, read unchanged. This is TransformerLens 4.3's ``transformer_lens.tools.analysis.JacobianLens``
in our labels (its layer ``l`` is our ``"{l+1}_pre"``; we also fit ``"0_pre"``); a TransformerLens lens
passed in ``lenses=`` is converted on the fly, and :mod:`~tl_latentspaces.jacobian_lens_formats` reads
and writes its objects and ``.pt`` artifacts.

:func:`fit_jacobian_lens` runs the model's own forward pass with capture hooks in a
:class:`~tl_latentspaces.hooks.HookSession` (the user's hooks act on what is differentiated), then takes
vector-Jacobian products from the final residual back to every source entry at once, over the corpus
runner's packed sequences, ``torchrun`` sharding and checkpoint format. Two estimators:

* ``mode="exact"``: TransformerLens's. Each sequence is replicated ``dim_batch`` times in one forward
  pass that keeps the graph only from the lowest source entry up; each of ``ceil(d_model / dim_batch)``
  backward passes carries one one-hot direction per copy.
* ``mode="sketch"``: ``probes`` random orthonormal directions ``Q`` (fresh per sequence) give
  ``R = Q^T J``; the estimate ``I + (d_model / probes) Q (R - Q^T)`` is unbiased and uses the identity
  (the skip path) as a control variate, so only ``J - I`` carries sketch noise. It costs
  ``probes / d_model`` of the exact work per sequence; see ``benchmarks/results/jacobian_lens.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm.auto import tqdm
from jaxtyping import Float

from tl_latentspaces.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from tl_latentspaces.checks import check_int
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.distributed import current_context, reduce_accumulator, shard_batches
from tl_latentspaces.hooks import HookSession
from tl_latentspaces.jacobian_lens_formats import (CONFIG_FILE, PARAMS_FILE, is_transformer_lens_jacobian_lens,
                                                   matrices_from_transformer_lens, read_lens_folder,
                                                   read_transformer_lens_file, save_transformer_lens_file,
                                                   to_transformer_lens, write_lens_folder)
from tl_latentspaces.model import ModelAccess, ModelIdentity, pre_layer

__all__ = ["JacobianLens", "fit_jacobian_lens", "is_transformer_lens_jacobian_lens", "CONFIG_FILE",
           "PARAMS_FILE", "DEFAULT_SKIP_FIRST_POSITIONS"]

PathLike = Union[str, os.PathLike]

#: TransformerLens's (and the reference implementation's) default: leading positions left out.
DEFAULT_SKIP_FIRST_POSITIONS = 16

MODES = ("exact", "sketch")
_CHECKPOINT = "jacobian-lens"  # files jacobian-lens-rank{r}.pt


def _model_kind(access: ModelAccess) -> str:
    """The residual basis a lens is fitted in: ``"bridge-raw"``, ``"bridge-compat"`` or ``"hooked"``."""
    if access.kind == "hooked":
        return "hooked"
    return "bridge-compat" if access.compatibility_mode else "bridge-raw"


def _check_key(access: ModelAccess) -> tuple:
    # Hashing W_U takes a fraction of a second; a lens skips it for the storage it checked last.
    return (id(access.model), access.W_U.data_ptr(), access.W_U._version)


def _in_stack_order(labels: Any) -> list[str]:
    """``"{l}_pre"`` labels sorted by layer."""
    return sorted(labels, key=lambda s: int(s[:-4]))


class JacobianLens:
    """Per-entry ``d_model x d_model`` Jacobians, read as ``ln_final(J h) @ W_U + b_U``.

    Args:
        identity: The model the lens is for (sizes and unembedding hash).
        matrices: ``{label: [d_model, d_model]}`` for ``"{l}_pre"`` labels; entries left out read
            with the identity (the logit lens). Stored as float32 on the CPU, in stack order.
        info: JSON-serialisable notes (fit settings, provenance); saved with the lens.
        name: The lens's name in results (two J-lenses read side by side need two names; see
            :meth:`renamed`).
    """

    def __init__(self, identity: ModelIdentity, matrices: dict[str, Float[torch.Tensor, "d_model d_model"]], *,
                 info: Optional[dict] = None, name: str = "jacobian"):
        if not isinstance(identity, ModelIdentity):
            raise TypeError(
                f"identity must be a ModelIdentity, got {type(identity).__name__}. Fit a lens with "
                "tl_latentspaces.fit_jacobian_lens(model, corpus) or convert one with "
                "JacobianLens.from_transformer_lens(lens, model)."
            )
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}.")
        L, d = identity.n_layers, identity.d_model
        if not isinstance(matrices, dict) or not matrices:
            raise ValueError("matrices must be a non-empty {label: [d_model, d_model] tensor} dict.")
        for label, m in matrices.items():
            if pre_layer(label, L) is None:
                raise ValueError(
                    f"a Jacobian lens has matrices for the '{{l}}_pre' entries 0_pre..{L - 1}_pre of "
                    f"this {L}-layer model; got the label {label!r}."
                )
            if not isinstance(m, torch.Tensor) or not m.is_floating_point() or tuple(m.shape) != (d, d):
                got = f"{list(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"matrices[{label!r}] must be a float tensor of shape [{d}, {d}], got {got}.")
            if not torch.isfinite(m).all():
                raise ValueError(f"matrices[{label!r}] holds NaN or inf values; a lens needs finite matrices.")
        self.identity = identity
        self.matrices = {label: matrices[label].detach().to("cpu", torch.float32).contiguous()
                         for label in _in_stack_order(matrices)}
        if info is not None and not isinstance(info, dict):
            raise TypeError(f"info must be a dict of JSON-serialisable notes, got {type(info).__name__}.")
        self.info = dict(info or {})
        self.name = name
        self._checked: Optional[tuple] = None

    @property
    def n_layers(self) -> int:
        return self.identity.n_layers

    @property
    def d_model(self) -> int:
        return self.identity.d_model

    @property
    def labels(self) -> list[str]:
        """The stack labels with a fitted matrix, in stack order."""
        return list(self.matrices)

    def __repr__(self) -> str:
        labels = self.labels
        span = labels[0] if len(labels) == 1 else f"{labels[0]}..{labels[-1]}"
        return (
            f"JacobianLens(name={self.name!r}, model={self.identity.name!r}, entries={span} "
            f"({len(labels)}), d_model={self.d_model}, n_prompts={self.info.get('n_prompts')})"
        )

    def renamed(self, name: str) -> "JacobianLens":
        """The same matrices under another name (to read two J-lenses side by side)."""
        return JacobianLens(self.identity, self.matrices, info=self.info, name=name)

    def transform_hidden(self, h: Float[torch.Tensor, "... d_model"], label: str) -> Float[torch.Tensor, "... d_model"]:
        """``J h`` for the residuals ``h`` of stack entry ``label`` (``"{l}_pre"``; unchanged without a matrix and
        for ``"final_post"``), float32."""
        if not isinstance(label, str) or (label != "final_post" and pre_layer(label, self.n_layers) is None):
            raise ValueError(
                f"the Jacobian lens reads the stack labels '0_pre'..'{self.n_layers - 1}_pre' and 'final_post'; got "
                f"{label!r}. (TransformerLens's JacobianLens numbers layers from 0 for our '1_pre'.)"
            )
        if h.shape[-1] != self.d_model:
            raise ValueError(f"residual vectors must have d_model={self.d_model} features, got shape {tuple(h.shape)}.")
        x = h.to(torch.float32)
        m = self.matrices.get(label)
        return x if m is None else x @ m.to(x.device).T

    def translate(self, x: Float[torch.Tensor, "n d_model"], label: str) -> Float[torch.Tensor, "n d_model"]:
        """The :class:`~tl_latentspaces.Lens` protocol: ``x @ J[label].T`` (unchanged for ``"final_post"``
        and for a ``"{l}_pre"`` entry without a matrix); a ``"{l}_mid"`` label raises ``ValueError``."""
        if isinstance(label, str) and label.endswith("_mid"):
            raise ValueError(
                f"the Jacobian lens has no matrix for stack entry {label!r}: it reads the "
                "'{l}_pre' entries and 'final_post'. Read it with incl_mid=False."
            )
        return self.transform_hidden(x, label)

    def check_model(self, model: Any) -> ModelAccess:
        """Raise ``ValueError`` naming every mismatch (sizes, unembedding hash) with ``model``; the hash also
        refuses the same weights in another residual basis (compatibility mode, processed weights)."""
        access = ModelAccess.of(model)
        key = _check_key(access)
        if key == self._checked:
            return access
        model_id = ModelIdentity.of(access)
        problems = self.identity.mismatches(model_id)
        if problems:
            raise ValueError(
                f"this Jacobian lens was fitted for {self.identity.name!r} "
                f"({self.info.get('model_kind', 'unknown kind')}) and does not fit model "
                f"{model_id.name!r} ({_model_kind(access)}): " + "; ".join(problems) + ". A J-lens "
                "belongs to one model in one residual basis: fit one for this model with "
                "tl_latentspaces.fit_jacobian_lens(model, corpus), or load the model the lens was made for."
            )
        self._checked = key
        return access

    def save(self, path: PathLike) -> Path:
        """Write the lens to the folder ``path`` (``jacobian_lens.json`` + ``jacobian_lens.safetensors``).

        Atomic; an existing lens folder is replaced, any other existing file or folder refused.
        """
        return write_lens_folder(self, Path(path))

    @classmethod
    def load(cls, path: PathLike, model: Any) -> "JacobianLens":
        """Load a lens saved by :meth:`save` and check it against ``model``."""
        identity, matrices, config = read_lens_folder(Path(path))
        lens = cls(identity, matrices, info=config.get("info") or {}, name=config.get("name", "jacobian"))
        lens.check_model(model)
        return lens

    @classmethod
    def from_transformer_lens(cls, lens: Any, model: Any, *, name: str = "jacobian") -> "JacobianLens":
        """Convert a TransformerLens ``JacobianLens`` (fitted or loaded) for reading ``model``.

        TransformerLens's own ``lens.validate_model(model)`` runs first (a raw ``TransformerBridge``, the
        recorded model name and revision, ``d_model``, the layer range, the final-block target); the result
        records ``model``'s identity, so later reads check sizes and the unembedding hash too. Its layer
        ``l`` becomes ``"{l+1}_pre"``.

        Raises:
            TypeError: If ``lens`` is not a TransformerLens ``JacobianLens``.
            ValueError: If TransformerLens's model check or ours fails.
        """
        access = ModelAccess.of(model)
        matrices, info = matrices_from_transformer_lens(lens, access)
        converted = cls(ModelIdentity.of(access), matrices, info=info, name=name)
        converted._checked = _check_key(access)  # its identity is this model's: no second hash
        return converted

    def to_transformer_lens(self) -> Any:
        """This lens as a ``transformer_lens.tools.analysis.JacobianLens`` (TransformerLens >= 4.3).

        ``"0_pre"`` has no TransformerLens layer and is left out. Only a lens fitted on (or
        converted for) a raw ``TransformerBridge`` exports.
        """
        return to_transformer_lens(self)

    def save_transformer_lens_format(self, path: PathLike, *, dtype: torch.dtype = torch.float16) -> Path:
        """Write TransformerLens's (and the reference implementation's) ``.pt`` artifact, atomically.

        Keys ``J`` (``{layer: matrix}`` in ``dtype``, float16 as theirs), ``n_prompts``, ``source_layers``,
        ``d_model`` and ``metadata``, loadable by ``JacobianLens.load`` there with ``weights_only=True``.
        """
        return save_transformer_lens_file(self, path, dtype)

    @classmethod
    def load_transformer_lens_format(cls, path: PathLike, model: Any, *, name: str = "jacobian") -> "JacobianLens":
        """Read a TransformerLens / reference ``.pt`` artifact (or fit checkpoint) for ``model``.

        Read with ``torch.load(weights_only=True)`` (never code) and checked as :meth:`from_transformer_lens`
        does (TransformerLens's ``validate_model`` needs TransformerLens >= 4.3).
        """
        return cls.from_transformer_lens(read_transformer_lens_file(path), model, name=name)


class _JacobianSums:
    """Running float64 sums of per-sequence Jacobian estimates: mergeable across processes."""

    def __init__(self, labels: list[str], d: int):
        self.labels = list(labels)
        self.sums = torch.zeros(len(labels), d, d, dtype=torch.float64)
        self.n = 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "n": self.n, "labels": list(self.labels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["labels"]) != self.labels:
            raise ValueError(f"cannot load Jacobian sums over {state['labels']} into sums over {self.labels}.")
        self.sums.copy_(state["sums"])
        self.n = int(state["n"])

    def merge(self, other: "_JacobianSums") -> "_JacobianSums":
        self.sums += other.sums
        self.n += other.n
        return self


def _resume(folder: PathLike, rank: int, fingerprint: str, sums: _JacobianSums) -> int:
    """Sequences of this process already fitted, loaded into ``sums`` (0 without a checkpoint)."""
    saved = load_checkpoint(folder, _CHECKPOINT, rank)
    if saved is None:
        return 0
    meta, states = saved
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(
            f"the checkpoint {str(checkpoint_path(folder, _CHECKPOINT, rank))!r} belongs to another corpus or other "
            "settings (mode, layers, probes, seed, number of processes); pass another checkpoint_dir or delete it."
        )
    sums.load_state_dict(states["sums"])
    return int(meta["done"])


def _resolve_sources(access: ModelAccess, layers: Any) -> list[str]:
    L = access.n_layers
    if layers is None:
        return [f"{layer}_pre" for layer in range(L)]
    out = set()
    for item in [layers] if isinstance(layers, (int, str)) else list(layers):
        if pre_layer(item, L) is not None:
            out.add(item)
        elif isinstance(item, int) and not isinstance(item, bool) and -L <= item < L:
            out.add(f"{item % L}_pre")
        else:
            raise ValueError(
                f"layers must hold stack labels '0_pre'..'{L - 1}_pre' or layer indices -{L}..{L - 1} "
                f"(layer l means the residual entering block l); got {item!r}."
            )
    if not out:
        raise ValueError("layers is empty; pass None for every '{l}_pre' entry.")
    return _in_stack_order(out)


def _forward_with_graph(access: ModelAccess, ids: torch.Tensor, sources: list[str],
                        target_name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass of the model's own, keeping the graph from the lowest source entry up.

    The lowest source's hook returns a detached copy that requires grad and switches autograd on
    for the rest of the pass, so the layers below it build no graph and no parameter's
    ``requires_grad`` changes. Sources and target are captured after the user's hooks there.
    """
    captured: dict[str, torch.Tensor] = {}
    names = {label: f"blocks.{int(label[:-4])}.hook_resid_pre" for label in sources}
    names["__target__"] = target_name

    def make(key: str, root: bool) -> Any:
        def hook(activation: torch.Tensor, hook: Any = None) -> Optional[torch.Tensor]:
            if root:
                activation = activation.detach().requires_grad_(True)
                torch.set_grad_enabled(True)  # restored by the torch.no_grad() block around the pass
            captured[key] = activation
            return activation if root else None

        return hook

    with HookSession(access) as session:
        for i, (key, point) in enumerate(names.items()):
            session.add(point, make(key, i == 0))
        with torch.no_grad():
            access.model(ids.to(access.device), return_type=None)
    missing = [point for key, point in names.items() if key not in captured]
    if missing:
        raise RuntimeError(
            f"no activation was captured at {missing}: the forward pass did not reach these hook points "
            "or other code removed the lens's hooks."
        )
    target = captured["__target__"]
    if not target.requires_grad:
        raise RuntimeError(
            f"the final residual ({target_name}) does not depend on the source entries: a hook between "
            "them replaced the stream with a constant, so there is no Jacobian to fit."
        )
    return target, [captured[s] for s in sources]


def _sequence_rows(access: ModelAccess, ids: torch.Tensor, directions: torch.Tensor, dim_batch: int,
                   sources: list[str], target_name: str, valid: torch.Tensor, bar: Any) -> list[torch.Tensor]:
    """``directions @ J`` (``[n, d]`` float64) of the one sequence ``ids`` (``[1, seq]``), per source entry.

    The sequence is replicated ``K = min(dim_batch, n)`` times in one forward pass; each of the
    ``ceil(n / K)`` backward passes plants direction ``a + k`` as the cotangent at every valid target
    position of copy ``k``, so copy ``k``'s gradient at source position ``t`` is
    ``direction^T sum_{t' >= t} d h_final[t'] / d h[t]``. Rows are averaged over valid source positions.
    """
    n, d = directions.shape
    K = min(dim_batch, n)
    target, srcs = _forward_with_graph(access, ids.expand(K, -1), sources, target_name)
    rows = [torch.zeros(n, d, dtype=torch.float64) for _ in sources]
    cot = torch.zeros_like(target)
    for a in range(0, n, K):
        z = min(a + K, n)
        cot.zero_()
        cot[: z - a, valid, :] = directions[a:z].to(target.device, target.dtype)[:, None, :]
        grads = torch.autograd.grad(target, srcs, cot, retain_graph=z < n)
        for si, g in enumerate(grads):
            rows[si][a:z] = g[: z - a, valid, :].to(torch.float64).mean(1).cpu()
        del grads
        bar.update(z - a)
    return rows


def fit_jacobian_lens(model: Any, corpus: Any = None, *, mode: str = "exact", seq_len: int = 128,
                      max_tokens: Optional[int] = 8 * 128, layers: Any = None,
                      skip_first_positions: int = DEFAULT_SKIP_FIRST_POSITIONS, dim_batch: int = 8, probes: int = 32,
                      prepend_bos: bool = True, seed: int = 0, name: Optional[str] = None,
                      checkpoint_dir: Optional[PathLike] = None, checkpoint_every: int = 1,
                      progress: bool = True) -> JacobianLens:
    """Fit a Jacobian lens on any supported model: ``HookedTransformer`` or ``TransformerBridge``.

    Each packed sequence contributes, with equal weight, its Jacobian of ``final_post`` with respect to
    every source entry (the module docstring's formula). The forward pass is the model's own: the user's
    hooks (an ablation upstream of a source, or between source and target) change the Jacobian.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` (raw or compatibility mode) in eval mode.
        corpus: As for :func:`~tl_latentspaces.corpus.tokenize_corpus`; default the training split of the
            offline corpus. For TransformerLens's ``JacobianLens.fit`` prompts, pass
            ``model.to_tokens(prompt)[:, :max_seq_len]`` rows as a token tensor.
        mode: ``"exact"`` (TransformerLens's estimator) or ``"sketch"`` (randomized; see the module
            docstring).
        seq_len: Tokens per sequence, BOS included.
        max_tokens: Use at most this many tokens (whole sequences); None for the whole corpus.
        layers: Entries to fit: ``"{l}_pre"`` labels or layer indices; default every ``"{l}_pre"``.
        skip_first_positions: Leading positions left out as sources and targets (16 as TransformerLens).
        dim_batch: Directions per backward pass, as TransformerLens's: each sequence is replicated this
            many times in the forward pass (memory grows with it, total work barely).
        probes: Random directions per sequence in ``"sketch"`` mode (``<= d_model``).
        prepend_bos: Start each sequence with BOS (when tokenizing text).
        seed: Seeds the sketch's random directions.
        name: The lens's name (default ``"jacobian"``, or ``"jacobian_sketch"`` in sketch mode).
        checkpoint_dir: Save the running sums here every ``checkpoint_every`` sequences (one
            ``jacobian-lens-rank{r}.pt`` per process) and resume from them: a resumed run ends with the
            same lens as an uninterrupted one.
        checkpoint_every: Sequences between checkpoints.
        progress: Show a progress bar (directions done).

    Returns:
        A :class:`JacobianLens` whose ``info`` records the settings, sequences and seconds.
    """
    access = ModelAccess.of(model)
    access.require_eval("fit_jacobian_lens")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}.")
    d, L = access.d_model, access.n_layers
    seq_len = check_int(seq_len, "seq_len", minimum=3, maximum=access.n_ctx, why=f" (the model's n_ctx={access.n_ctx})")
    skip = check_int(skip_first_positions, "skip_first_positions", minimum=0)
    if seq_len <= skip + 1:
        raise ValueError(
            f"seq_len={seq_len} leaves no valid position after skip_first_positions={skip} and the last "
            f"position; use seq_len >= {skip + 2} or a smaller skip_first_positions."
        )
    dim_batch = check_int(dim_batch, "dim_batch", minimum=1)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", minimum=1)
    probes = check_int(probes, "probes", minimum=1, maximum=d, why=" (d_model)") if mode == "sketch" else None
    if max_tokens is not None:
        max_tokens = check_int(max_tokens, "max_tokens", minimum=seq_len, why=" (seq_len: one sequence)")
    seed = check_int(seed, "seed", minimum=0)
    sources = _resolve_sources(access, layers)
    target_name = f"blocks.{L - 1}.hook_resid_post"
    corpus = default_corpus("train") if corpus is None else corpus
    seqs = tokenize_corpus(access, corpus, seq_len=seq_len, prepend_bos=prepend_bos, max_tokens=max_tokens)
    ctx = current_context()
    mine = list(shard_batches(seqs.shape[0], ctx))
    # The last position is neither a source nor a target, and by causality nothing before it
    # depends on it: it is left out of the forward pass.
    valid = torch.arange(skip, seq_len - 1, device=access.device)
    gen = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=torch.float64)
    sums = _JacobianSums(sources, d)
    settings = {"mode": mode, "skip": skip, "probes": probes, "seed": seed, "sources": sources,
                "world_size": ctx.world_size}
    digest = hashlib.sha256(seqs.numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    fingerprint = digest.hexdigest()[:16]
    done = 0 if checkpoint_dir is None else _resume(checkpoint_dir, ctx.rank, fingerprint, sums)
    start_time = time.perf_counter()
    bar = tqdm(total=(len(mine) - done) * (d if mode == "exact" else probes), desc=f"Jacobian lens ({mode})",
               unit="dir", disable=not (progress and ctx.is_main))
    try:
        k = 0  # sequences of this rank seen so far
        for i in range(seqs.shape[0]):
            dirs = eye
            if mode == "sketch":
                # Every rank draws every sequence's directions (a resumed run too), so the estimate
                # does not depend on the number of processes or interruptions.
                Q = torch.linalg.qr(torch.randn(d, probes, generator=gen, dtype=torch.float64))[0]
                dirs = Q.T  # rows: random orthonormal directions
            if i not in mine:
                continue
            k += 1
            if k <= done:
                continue
            ids = seqs[i : i + 1, : seq_len - 1]
            rows = _sequence_rows(access, ids, dirs, dim_batch, sources, target_name, valid, bar)
            for si, r in enumerate(rows):
                # sketch: I + (d/m) Q (Q^T J - Q^T), unbiased with the identity as control variate
                sums.sums[si] += r if mode == "exact" else eye + (d / probes) * Q @ (r - Q.T)
            sums.n += 1
            if checkpoint_dir is not None and (k % checkpoint_every == 0 or k == len(mine)):
                save_checkpoint(checkpoint_dir, _CHECKPOINT, ctx.rank, {"fingerprint": fingerprint, "done": k},
                                {"sums": sums.state_dict()})
    finally:
        bar.close()
    reduce_accumulator(sums, lambda: _JacobianSums(sources, d))
    if sums.n == 0:
        raise ValueError("no sequence was fitted; pass a longer corpus or a larger max_tokens.")
    seconds = time.perf_counter() - start_time
    matrices = {label: (sums.sums[i] / sums.n).to(torch.float32) for i, label in enumerate(sources)}
    fit = {"mode": mode, "seq_len": seq_len, "skip_first_positions": skip,
           "probes": probes if mode == "sketch" else None, "dim_batch": dim_batch, "seed": seed,
           "seconds": round(seconds, 3), "world_size": ctx.world_size, "target": target_name}
    info = {"model_kind": _model_kind(access), "n_prompts": sums.n, "fit": fit}
    default_name = "jacobian" if mode == "exact" else "jacobian_sketch"
    return JacobianLens(ModelIdentity.of(access), matrices, info=info, name=name or default_name)
