"""Fitting a tuned lens fast, in three phases bounded in memory:

1. **Collection** (a :class:`~tl_latentspaces.runner.CorpusRunner` consumer): without position 0 and
   *massive-activation* positions, each layer's normal equations in float64; the held-out validation
   positions and a ``refine_tokens`` subset as float32.
2. **Closed form**: per layer, ridge least squares toward the identity, the ridge chosen by validation KL.
3. **Refinement**: Gauss-Newton steps on KL(final || lens), Kronecker-factored curvature (Martens & Grosse
   2015) on the ``refine_vocab`` most probable tokens; kept only where the full-vocabulary KL improves.

On a GPU the refinement's vocabulary matmuls run under bfloat16 autocast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from tl_latentspaces.checkpoints import load_checkpoint, save_checkpoint
from tl_latentspaces.checks import check_device, check_float, check_int
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.distributed import current_context, shard_batches
from tl_latentspaces.files import json_safe
from tl_latentspaces.model import ModelAccess, ModelIdentity
from tl_latentspaces.runner import CorpusRunner
from tl_latentspaces.translator_solvers import (FitSettings, FitStats, TunedLensFitError, WorkingReadout,
                                                choose_targets, closed_form, refine)
from tl_latentspaces.translators import TunedLens

__all__ = ["fit_tuned_lens", "FitSettings", "TunedLensFitError"]

_MAX_VALIDATION_TOKENS = 1024
_CHECKPOINT = "tuned-lens-fit"  # the fit's file in checkpoint_dir, next to the corpus runner's


# ---------------------------------------------------------------------- the fit
def fit_tuned_lens(model: Any, corpus: Any = None, *, max_tokens: int = 16384, seq_len: Optional[int] = None,
                   batch_size: int = 16, validation_fraction: float = 0.1,
                   ridge: Union[float, Sequence[float]] = (1e-3, 1e-2, 1e-1), refine_steps: int = 2,
                   refine_tokens: int = 8192, refine_vocab: int = 2048, damping: float = 10.0,
                   massive_factor: float = 6.0, seed: int = 0, checkpoint_dir: Union[str, os.PathLike, None] = None,
                   checkpoint_every: int = 8, device: Union[str, torch.device, None] = None,
                   progress: bool = True) -> TunedLens:
    """Fit a tuned lens for ``model`` on ``corpus``: closed form, then Gauss-Newton on the KL.

    Deterministic for a seed; with ``checkpoint_dir`` an interrupted fit resumes to the same lens.

    Args:
        corpus: Texts, file paths (``.txt``/``.jsonl``) or a ``[n, seq_len]`` token tensor; default the
            training split of the offline default corpus.
        max_tokens: Use at most this many tokens (whole sequences).
        seq_len: Tokens per sequence, BOS included (default 128, or the width of a token tensor).
        validation_fraction: Share of the sequences held out (at most 1024 tokens) to choose the ridge and
            step sizes and to check the refinement.
        ridge: Relative ridge strengths to choose from; the penalty on ``W_l`` is
            ``max(ridge, 1e-9) * n * mean(h_l ** 2)``.
        refine_steps: Gauss-Newton steps per layer (0 keeps the closed form).
        refine_tokens: Training tokens kept for the refinement.
        refine_vocab: Size of the refinement's working vocabulary.
        damping: Levenberg-Marquardt damping of the output curvature, relative to its mean diagonal.
        massive_factor: Leave out positions whose residual norm at some layer exceeds this multiple of the median.
        seed: Seeds the validation split and the choice of refinement tokens.
        checkpoint_dir: Folder for checkpoints; a fit with the same model, data and settings resumes from it.
        checkpoint_every: Save the collection every this many training batches.
        device: Where to fit (default the model's device).

    Returns:
        A :class:`~tl_latentspaces.TunedLens` on ``device``; ``lens.info["fit"]`` records the settings, the
        chosen ridges and the validation KL of every layer.

    Raises:
        ValueError: On a bad setting, too few tokens (the message gives the minimum), or a checkpoint of
            another fit or model.
        TunedLensFitError: If a loss or statistic becomes non-finite (the message names the layer and step).

    Example:
        >>> lens = tll.fit_tuned_lens(model)  # default corpus: minutes on 2 CPU cores  # doctest: +SKIP
        >>> lens.info["fit"]["val_kl_refined"][:3]  # doctest: +SKIP
    """
    started = time.perf_counter()
    access = ModelAccess.of(model)
    access.require_eval("fit_tuned_lens")
    max_tokens = check_int(max_tokens, "max_tokens", minimum=2)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    refine_steps = check_int(refine_steps, "refine_steps", minimum=0)
    refine_tokens = check_int(refine_tokens, "refine_tokens", minimum=1)
    refine_vocab = check_int(refine_vocab, "refine_vocab", minimum=2)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", minimum=1)
    seed = check_int(seed, "seed", minimum=0)
    validation_fraction = check_float(validation_fraction, "validation_fraction", minimum=0.0, maximum=0.5,
                                      open_minimum=True)
    damping = check_float(damping, "damping", minimum=0.0, open_minimum=True)
    massive_factor = check_float(massive_factor, "massive_factor", minimum=1.0, open_minimum=True)
    ridges = tuple(ridge) if isinstance(ridge, (list, tuple)) else (ridge,)  # check_float names a wrong type
    if not ridges:
        raise ValueError("ridge is empty; pass a relative ridge strength such as 1e-2, or a few of them.")
    ridges = tuple(check_float(r, "each ridge strength", minimum=0.0) for r in ridges)
    if corpus is None:
        corpus = default_corpus("train")
    if seq_len is None:
        seq_len = int(corpus.shape[1]) if isinstance(corpus, torch.Tensor) and corpus.ndim == 2 else 128
    seq_len = check_int(seq_len, "seq_len", minimum=3)
    if isinstance(corpus, (list, tuple)) and not corpus:
        raise ValueError(
            "the corpus is empty: pass texts (a list of strings), file paths or a [n, seq_len] "
            "token tensor, or None for the default offline corpus."
        )
    dev = check_device(device) if device is not None else access.device
    settings = FitSettings(max_tokens, seq_len, batch_size, validation_fraction, ridges, refine_steps, refine_tokens,
                           refine_vocab, damping, massive_factor, seed)
    seqs = tokenize_corpus(access, corpus, seq_len=seq_len, max_tokens=max_tokens)
    min_train = 2 * (access.d_model + 1)
    if seqs.shape[0] < 2:
        raise ValueError(
            f"the corpus gives {seqs.shape[0]} sequence of seq_len={seq_len} tokens; a fit needs at "
            "least 2 (one held out for validation) and, to determine the translators, at least "
            f"{min_train} training positions. Pass more text or a smaller seq_len."
        )
    cap = max(1, math.ceil(_MAX_VALIDATION_TOKENS / (seq_len - 1)))
    n_val = max(1, min(round(validation_fraction * seqs.shape[0]), cap, seqs.shape[0] - 1))
    if (seqs.shape[0] - n_val) * (seq_len - 1) < min_train:
        raise ValueError(
            f"the corpus gives {seqs.shape[0]} sequences of {seq_len} tokens, {n_val} of them held out: "
            f"at most {(seqs.shape[0] - n_val) * (seq_len - 1)} training positions (position 0 is left "
            f"out), but a translator for d_model={access.d_model} needs at least {min_train} "
            f"(2 x (d_model + 1)). Pass more text (about {math.ceil(min_train / (seq_len - 1)) + n_val + 1} "
            "sequences' worth) or a larger max_tokens."
        )
    identity = ModelIdentity.of(access)
    ckpt = None if checkpoint_dir is None else _Checkpoint(checkpoint_dir, settings, identity, seqs)
    order = torch.randperm(seqs.shape[0], generator=torch.Generator().manual_seed(seed))
    n_refine = min(len(order) - n_val, math.ceil(refine_tokens / (seq_len - 1))) if refine_steps else 0
    readout = WorkingReadout(access, dev)

    phases = {}
    t0 = time.perf_counter()
    stats = _collect(access, seqs[order], n_val, n_refine, settings, dev, ckpt, checkpoint_every, progress)
    phases["collect"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_t, ref_t = choose_targets(readout, stats, settings)
    weight, bias, report = closed_form(stats, readout, val_t, settings, ckpt)
    phases["closed_form"] = time.perf_counter() - t0
    if refine_steps:
        t0 = time.perf_counter()
        weight, bias, report = refine(stats, readout, val_t, ref_t, settings, weight, bias, report, ckpt, progress)
        phases["refine"] = time.perf_counter() - t0
    report.update(seconds=round(time.perf_counter() - started, 2),
                  phase_seconds={k: round(v, 2) for k, v in phases.items()}, n_train_positions=int(stats.n),
                  n_validation_positions=int(stats.val.shape[1]), n_excluded_positions=int(stats.n_excluded),
                  settings=asdict(settings))
    lens = TunedLens(identity, weight=weight.float(), bias=bias.float(), info={"fit": json_safe(report)})
    if ckpt is not None:
        ckpt.save(done=True)
    return lens.to(dev)


# ---------------------------------------------------------------------- phase 1: collection
def _keep_mask(stack: torch.Tensor, factor: float) -> torch.Tensor:
    """``[batch, pos]``: positions to fit on; out are position 0 and positions whose norm at some entry exceeds
    ``factor`` times that entry's median over the batch's positions 1.."""
    norms = stack.float().norm(dim=-1)  # [E, B, S]
    body = norms[:, :, 1:]
    median = body.reshape(body.shape[0], -1).median(dim=1).values.clamp_min(1e-12)
    massive = (norms > factor * median[:, None, None]).any(0)
    keep = ~massive
    keep[:, 0] = False
    return keep


class _Collection:
    """A corpus-runner consumer: the kept positions of the first ``n_kept`` sequences as float32 rows, and with
    ``normal_equations`` the float64 ``X^T X``, ``X^T Y`` of every layer against the final residual.

    Rows are tagged with their batch, so a merge of ranks puts them in the single-process order.
    """

    def __init__(self, access: ModelAccess, device: torch.device, settings: FitSettings, n_batches: int,
                 n_kept: int, normal_equations: bool):
        L, d = access.n_layers, access.d_model
        self.device, self.factor, self.batch_size = device, settings.massive_factor, settings.batch_size
        self.batches, self.n_kept = list(shard_batches(n_batches)), n_kept
        self.XtX = torch.zeros(L, d + 1, d + 1, dtype=torch.float64, device=device) if normal_equations else None
        self.XtY = torch.zeros(L, d + 1, d, dtype=torch.float64, device=device) if normal_equations else None
        self.n = self.n_excluded = self.updates = 0
        self.parts = [(torch.zeros(0, dtype=torch.int64), torch.zeros(L + 1, 0, d, device=device))]
        self.saved = False

    def update(self, ids: torch.Tensor, stack: torch.Tensor) -> None:
        if self.saved:  # the runner wrote a checkpoint of this state before this batch
            self.saved = False
            _checkpoint_saved("collect", {"batches_done": self.updates})
        batch = self.batches[self.updates]
        self.updates += 1
        keep = _keep_mask(stack, self.factor)
        self.n_excluded += int((~keep[:, 1:]).sum())
        first = batch * self.batch_size
        kept = torch.arange(first, first + ids.shape[0], device=keep.device) < self.n_kept
        if bool(kept.any()):
            rows = stack[:, keep & kept[:, None]].to(self.device, torch.float32)
            self.parts.append((torch.full((rows.shape[1],), batch, dtype=torch.int64), rows))
        if self.XtX is None or not bool(keep.any()):
            return
        rows = stack[:, keep].to(self.device, torch.float32)
        Y = rows[-1].double()
        ones = torch.ones(Y.shape[0], 1, dtype=torch.float64, device=Y.device)
        for layer in range(rows.shape[0] - 1):
            X = torch.cat([rows[layer].double(), ones], 1)
            self.XtX[layer].addmm_(X.T, X)
            self.XtY[layer].addmm_(X.T, Y)
        if not (torch.isfinite(self.XtX).all() and torch.isfinite(self.XtY).all()):
            raise TunedLensFitError(
                f"the normal equations became non-finite at training batch {batch}: the residual stream "
                "holds values too large for float64 sums. Check the model's weights, or lower massive_factor "
                "to leave out more outlier positions."
            )
        self.n += Y.shape[0]

    def rows(self) -> torch.Tensor:
        """The kept rows ``[L+1, n, d]`` in batch order."""
        order = torch.argsort(torch.cat([t for t, _ in self.parts]), stable=True)
        rows = torch.cat([r for _, r in self.parts], 1)
        return rows if bool((order == torch.arange(len(order))).all()) else rows[:, order.to(self.device)]

    def state_dict(self) -> dict[str, Any]:
        self.saved = True
        return {"XtX": self.XtX, "XtY": self.XtY, "n": self.n, "n_excluded": self.n_excluded,
                "updates": self.updates, "tags": torch.cat([t for t, _ in self.parts]),
                "rows": torch.cat([r for _, r in self.parts], 1)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.XtX, self.XtY = (None if state[k] is None else state[k].to(self.device) for k in ("XtX", "XtY"))
        self.n, self.n_excluded, self.updates = int(state["n"]), int(state["n_excluded"]), int(state["updates"])
        self.parts = [(state["tags"].cpu(), state["rows"].to(self.device))]

    def merge(self, other: "_Collection") -> "_Collection":
        if self.XtX is not None:
            self.XtX += other.XtX
            self.XtY += other.XtY
        self.n += other.n
        self.n_excluded += other.n_excluded
        self.parts += other.parts
        return self


def _collect(access: ModelAccess, seqs: torch.Tensor, n_val: int, n_refine: int, settings: FitSettings,
             dev: torch.device, ckpt: Optional["_Checkpoint"], every: int, progress: bool) -> FitStats:
    """Stream the first ``n_val`` sequences (validation), then the others (training) through the corpus runner,
    so no batch mixes the two; the refinement rows are the first ``n_refine`` training sequences'. Only the
    training pass, the long one, is checkpointed."""
    folder = None if ckpt is None else ckpt.folder
    passes = []
    for part, n_kept, where, normal, desc in ((seqs[:n_val], n_val, None, False, "validation"),
                                              (seqs[n_val:], n_refine, folder, True, "training")):
        runner = CorpusRunner(access, part, seq_len=part.shape[1], batch_size=settings.batch_size,
                              checkpoint_dir=where, checkpoint_every=every, progress=progress,
                              desc=f"tuned lens: {desc} activations")
        fresh = functools.partial(_Collection, access, dev, settings, runner.n_batches, n_kept, normal)
        passes.append(runner.run({"tuned_lens_collection": fresh})["tuned_lens_collection"])
        if where is not None:
            _checkpoint_saved("collect", {"batches_done": passes[-1].updates})
    val, train = passes
    d, val_rows = access.d_model, val.rows()
    if val_rows.shape[1] == 0:
        raise ValueError(
            "every validation position was left out (position 0 or a massive activation); pass more "
            f"text or a larger massive_factor (now {settings.massive_factor})."
        )
    if train.n < 2 * (d + 1):
        raise ValueError(
            f"only {train.n} training positions remain after leaving out position 0 and "
            f"{val.n_excluded + train.n_excluded} massive-activation positions; a translator for d_model={d} "
            f"needs at least {2 * (d + 1)}. Pass more text or a larger massive_factor (now {settings.massive_factor})."
        )
    return FitStats(XtX=train.XtX, XtY=train.XtY, n=train.n, val=val_rows, refine=train.rows(),
                  n_excluded=val.n_excluded + train.n_excluded)


# ---------------------------------------------------------------------- checkpoints
class _Checkpoint:
    """The fit's checkpoint folder (:mod:`~tl_latentspaces.checkpoints`): the corpus runner's files of the
    collection and ``tuned-lens-fit-rank0.pt``: the model identity, a key of corpus and settings, and the lens of
    the latest phase with its report (one file, replaced atomically, so a crash leaves a consistent state)."""

    def __init__(self, folder: Union[str, os.PathLike], settings: FitSettings, identity: ModelIdentity,
                 seqs: torch.Tensor):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint_dir {str(self.folder)!r} exists and is not a folder; pass a folder path.")
        if (self.folder / "state.json").is_file():
            raise ValueError(f"checkpoint_dir {str(self.folder)!r} holds a tuned-lens fit checkpoint of an earlier "
                             "version (state.json), which this version cannot resume. Delete the folder to start "
                             "over, or pass another checkpoint_dir.")
        digest = hashlib.sha256(json.dumps(asdict(settings), sort_keys=True).encode())
        digest.update(seqs.to("cpu", torch.int64).contiguous().numpy().tobytes())
        self.meta = {"key": digest.hexdigest()[:24], "model": asdict(identity), "phase": None, "done": False}
        self.states: dict[str, torch.Tensor] = {}
        saved = load_checkpoint(self.folder, _CHECKPOINT, 0)
        if saved is None:
            self.save()  # the key and model first, so a resumed collection is checked against them
            return
        try:
            recorded = ModelIdentity(**saved[0]["model"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"the fit checkpoint in {str(self.folder)!r} has no valid 'model' section ({err}); "
                             "delete the folder to start over.") from None
        recorded.require_same(identity, f"the fit checkpoint in {str(self.folder)!r}")
        if saved[0].get("key") != self.meta["key"]:
            raise ValueError(
                f"checkpoint_dir {str(self.folder)!r} holds the checkpoint of another fit (same model, "
                "other corpus or settings); resuming it would mix two fits. Pass an empty folder, or "
                "delete this one to start over."
            )
        self.meta, self.states = saved

    def lens(self, device: torch.device) -> Optional[tuple[torch.Tensor, torch.Tensor, dict]]:
        """``(weight, bias, report)`` of the latest phase saved, or None before the closed form."""
        if self.meta.get("phase") is None:
            return None
        return self.states["weight"].to(device), self.states["bias"].to(device), self.meta["report"]

    def save_lens(self, phase: str, weight: torch.Tensor, bias: torch.Tensor, report: dict,
                  layers_done: int) -> None:
        self.states = {"weight": weight.detach().cpu(), "bias": bias.detach().cpu()}
        self.save(phase=phase, layers_done=layers_done, report=json_safe(report))
        _checkpoint_saved(phase, self.meta)

    def save(self, **changes: Any) -> None:
        """Set ``changes`` in the metadata and write the checkpoint (rank 0 alone: every rank holds the same)."""
        self.meta.update(changes)
        if current_context().is_main:
            save_checkpoint(self.folder, _CHECKPOINT, 0, self.meta, self.states)


def _checkpoint_saved(phase: str, extra: dict) -> None:
    """Called after every checkpoint write (a seam for tests that interrupt a fit)."""
