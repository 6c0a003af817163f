"""Fitting a tuned lens fast: closed-form least squares, then Gauss-Newton steps on the KL.

:func:`fit_tuned_lens` fits one affine translator per layer so that ``ln_final(h_l + W_l h_l + b_l) @ W_U``
predicts the model's own next-token distribution, in three phases bounded in memory:

1. **Collection**, a :class:`~tl_latentspaces.runner.CorpusRunner` consumer: leaving out position 0 and
   *massive-activation* positions, the normal equations of each layer accumulate in float64; the held-out
   validation positions and a ``refine_tokens`` subset are kept as float32.
2. **Closed form.** Per layer, ridge least squares toward the identity, the ridge chosen by validation KL.
3. **Refinement.** A few Gauss-Newton steps on KL(final || lens) with a Kronecker-factored curvature
   (Martens & Grosse 2015) over a working vocabulary of the ``refine_vocab`` most probable tokens; a refined
   translator is kept only if its full-vocabulary validation KL beats the closed form's.

Deterministic for a seed; with ``checkpoint_dir`` an interrupted fit resumes to the same lens. On a GPU the
vocabulary matmuls of the refinement run under bfloat16 autocast.

Example:
    >>> lens = tll.fit_tuned_lens(model)  # default offline corpus: a few minutes on 2 CPU cores  # doctest: +SKIP
    >>> tll.tuned_lens(model, "The Eiffel Tower is in the city of", lens).summary()  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from tl_latentspaces.checkpoints import load_checkpoint, save_checkpoint
from tl_latentspaces.checks import check_float, check_int
from tl_latentspaces.corpus import default_corpus, tokenize_corpus
from tl_latentspaces.distributed import all_reduce_sum, current_context, shard_batches
from tl_latentspaces.files import json_safe
from tl_latentspaces.model import ModelAccess, ModelIdentity
from tl_latentspaces.runner import CorpusRunner
from tl_latentspaces.translators import TunedLens, translate_rows

__all__ = ["fit_tuned_lens", "FitSettings", "TunedLensFitError"]

_MAX_VALIDATION_TOKENS = 1024
_CHECK_TOKENS = 512  # validation positions that choose ridge and step sizes (working vocabulary)
_FULL_CHECK_TOKENS = 128  # of those, the ones whose full-vocabulary KL decides what is kept
_VOCAB_TOKENS = 1024  # positions whose final distributions choose the working vocabulary
_CHECKPOINT = "tuned-lens-fit"  # the fit's file in checkpoint_dir, next to the corpus runner's


class TunedLensFitError(RuntimeError):
    """The fit cannot go on (a non-finite loss or statistic); the message names where."""


@dataclass(frozen=True)
class FitSettings:
    """The settings of one fit (saved in the lens's ``info`` and keyed into checkpoints)."""

    max_tokens: int
    seq_len: int
    batch_size: int
    validation_fraction: float
    ridge: tuple[float, ...]
    refine_steps: int
    refine_tokens: int
    refine_vocab: int
    damping: float
    massive_factor: float
    seed: int


# ---------------------------------------------------------------------- the fit
def fit_tuned_lens(model: Any, corpus: Any = None, *, max_tokens: int = 16384, seq_len: Optional[int] = None,
                   batch_size: int = 16, validation_fraction: float = 0.1,
                   ridge: Union[float, Sequence[float]] = (1e-3, 1e-2, 1e-1), refine_steps: int = 2,
                   refine_tokens: int = 8192, refine_vocab: int = 2048, damping: float = 10.0,
                   massive_factor: float = 6.0, seed: int = 0, checkpoint_dir: Union[str, os.PathLike, None] = None,
                   checkpoint_every: int = 8, device: Union[str, torch.device, None] = None,
                   progress: bool = True) -> TunedLens:
    """Fit a tuned lens for ``model`` on ``corpus``: closed form, then Gauss-Newton on the KL.

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
        >>> lens = fit_tuned_lens(model, ["A long training text ..."] * 100, max_tokens=16384)  # doctest: +SKIP
        >>> lens.info["fit"]["val_kl_refined"][:3]  # doctest: +SKIP
    """
    started = time.perf_counter()
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
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
    ridges = (ridge,) if isinstance(ridge, (int, float)) and not isinstance(ridge, bool) else tuple(ridge)
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
    dev = torch.device(device) if device is not None else access.device
    settings = FitSettings(max_tokens, seq_len, batch_size, validation_fraction, ridges, refine_steps, refine_tokens,
                           refine_vocab, damping, massive_factor, seed)
    seqs = tokenize_corpus(access, corpus, seq_len=seq_len, max_tokens=max_tokens)
    if seqs.shape[0] < 2:
        raise ValueError(
            f"the corpus gives {seqs.shape[0]} sequence of seq_len={seq_len} tokens; a fit needs at "
            "least 2 (one held out for validation) and, to determine the translators, at least "
            f"{2 * (access.d_model + 1)} training positions. Pass more text or a smaller seq_len."
        )
    cap = max(1, math.ceil(_MAX_VALIDATION_TOKENS / (seq_len - 1)))
    n_val = max(1, min(round(validation_fraction * seqs.shape[0]), cap, seqs.shape[0] - 1))
    min_train = 2 * (access.d_model + 1)
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
    readout = _Readout(access, dev)

    phases = {}
    t0 = time.perf_counter()
    stats = _collect(access, seqs[order], n_val, n_refine, settings, dev, ckpt, checkpoint_every, progress)
    phases["collect"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    val_t, ref_t = _targets(readout, stats, settings)
    weight, bias, report = _closed_form(stats, readout, val_t, settings, ckpt)
    phases["closed_form"] = time.perf_counter() - t0
    if refine_steps:
        t0 = time.perf_counter()
        weight, bias, report = _refine(stats, readout, val_t, ref_t, settings, weight, bias, report, ckpt, progress)
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
@dataclass
class _Stats:
    """What collection keeps: float64 normal equations and float32 activation subsets."""

    XtX: torch.Tensor  # [L, d+1, d+1] float64
    XtY: torch.Tensor  # [L, d+1, d] float64
    n: int  # training positions accumulated
    val: torch.Tensor  # [L+1, n_val_pos, d] float32
    refine: torch.Tensor  # [L+1, n_ref_pos, d] float32
    n_excluded: int


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
             dev: torch.device, ckpt: Optional["_Checkpoint"], every: int, progress: bool) -> _Stats:
    """Stream the first ``n_val`` sequences (validation), then the others (training) through the corpus runner,
    so no batch mixes the two; the refinement rows are the first ``n_refine`` training sequences'. Only the
    training pass, the long one, is checkpointed."""
    folder = None if ckpt is None else ckpt.folder
    passes = []
    for part, n_kept, where, normal in ((seqs[:n_val], n_val, None, False), (seqs[n_val:], n_refine, folder, True)):
        runner = CorpusRunner(access, part, seq_len=part.shape[1], batch_size=settings.batch_size,
                              checkpoint_dir=where, checkpoint_every=every, progress=progress)
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
    return _Stats(XtX=train.XtX, XtY=train.XtY, n=train.n, val=val_rows, refine=train.rows(),
                  n_excluded=val.n_excluded + train.n_excluded)


# ---------------------------------------------------------------------- norm and scores
class _Readout:
    """The final norm, ``W_U`` and ``b_U`` (float32, on ``device``), the columns of the working vocabulary once
    chosen (:meth:`restrict`), and the norm's vector-Jacobian product."""

    def __init__(self, access: ModelAccess, device: torch.device):
        self.access = access
        self.device = device
        self.W_U = access.W_U.detach().to(device, torch.float32)
        b = access.b_U.detach().to(device, torch.float32)
        self.b_U = b if bool(b.any()) else None
        self.autocast = device.type == "cuda"
        self.vocab, self.W_k, self.b_k = None, self.W_U, self.b_U

    def restrict(self, vocab: torch.Tensor) -> None:
        """Score ``vocab`` (token ids) alone when ``logits(..., working=True)``."""
        self.vocab = vocab
        self.W_k = self.W_U[:, vocab].contiguous()
        self.b_k = self.b_U[vocab] if self.b_U is not None else None

    def norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.access.final_norm(h.to(self.access.device)).to(self.device)

    def logits(self, n: torch.Tensor, working: bool = False) -> torch.Tensor:
        W, b = (self.W_k, self.b_k) if working else (self.W_U, self.b_U)
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                z = (n @ W).float()
        else:
            z = n @ W
        return z if b is None else z + b

    def norm_vjp(self, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(J^T g, scale)`` for ``n = ln_final(h)``, with ``J ~ diag(gain) / scale`` per row."""
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.norm(h), h, g)
        return grad, self.access.final_norm_scale(h.detach())


@dataclass
class _Targets:
    """The final distribution of a set of positions: full and on the working vocabulary."""

    log_p: Optional[torch.Tensor]  # [n, V] full-vocabulary log-probabilities, or None
    p_k: torch.Tensor  # [n, K] final probabilities renormalised on the working vocabulary
    log_p_k: torch.Tensor  # [n, K]
    u_k: torch.Tensor  # [n, d] = p_k @ W_k.T


def _restricted_targets(readout: _Readout, final: torch.Tensor, full_rows: int = 0, chunk: int = 512) -> _Targets:
    """The final distribution on the working vocabulary, and on the full one for the first ``full_rows``."""
    log_p, p_k, log_p_k, u_k = [], [], [], []
    for s in range(0, final.shape[0], chunk):
        n = readout.norm(final[s : s + chunk])
        if s < full_rows:
            log_p.append(torch.log_softmax(readout.logits(n[: full_rows - s]), -1))
        lk = torch.log_softmax(readout.logits(n, working=True), -1)
        pk = lk.exp()
        log_p_k.append(lk)
        p_k.append(pk)
        u_k.append(pk @ readout.W_k.T)
    return _Targets(log_p=torch.cat(log_p, 0) if log_p else None, p_k=torch.cat(p_k, 0),
                    log_p_k=torch.cat(log_p_k, 0), u_k=torch.cat(u_k, 0))


def _targets(readout: _Readout, stats: _Stats, settings: FitSettings,
             chunk: int = 512) -> tuple[_Targets, Optional[_Targets]]:
    """Choose the working vocabulary (the ``refine_vocab`` tokens with the most final probability mass) on
    ``readout``; return the targets of the check positions and of the refinement positions (or None)."""
    final = (stats.refine[-1] if stats.refine.shape[1] else stats.val[-1])[:_VOCAB_TOKENS]
    V = readout.W_U.shape[1]
    if settings.refine_vocab >= V:
        readout.restrict(torch.arange(V, device=readout.device))
    else:
        mass = torch.zeros(V, dtype=torch.float64, device=readout.device)
        for s in range(0, final.shape[0], chunk):
            mass += torch.softmax(readout.logits(readout.norm(final[s : s + chunk])), -1).double().sum(0)
        # Ties broken by token id, so the choice is deterministic.
        readout.restrict(torch.sort(torch.argsort(-mass, stable=True)[: settings.refine_vocab]).values)
    val = _restricted_targets(readout, stats.val[-1, :_CHECK_TOKENS], full_rows=_FULL_CHECK_TOKENS)
    refining = settings.refine_steps and stats.refine.shape[1]
    return val, (_restricted_targets(readout, stats.refine[-1]) if refining else None)


def _kl(readout: _Readout, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, log_p: torch.Tensor,
        working: bool = False, chunk: int = 512) -> float:
    """Mean KL(final || lens) over ``x``'s rows, on the full vocabulary or on the working one."""
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        lq = torch.log_softmax(readout.logits(readout.norm(translate_rows(x[s : s + chunk], W, b)), working), -1)
        lp = log_p[s : s + chunk]
        total += float((lp.exp() * (lp - lq)).sum(dtype=torch.float64))
    return total / x.shape[0]


# ---------------------------------------------------------------------- phase 2: closed form
def _ridged(S: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``S`` plus ``lam`` on the diagonal, except the intercept's (last) entry: the bias is not penalised."""
    pen = torch.ones(S.shape[0], dtype=S.dtype, device=S.device)
    pen[-1] = 0.0
    return S + torch.diag(lam * pen)


def _solve_ridge(XtX: torch.Tensor, XtY: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares toward the identity: ``(W, b)`` with ``Y ~ X + X W^T + b``."""
    d = XtY.shape[1]
    # The floor keeps "no ridge" solvable when the residual never leaves a subspace (centred writing weights).
    lam = max(alpha, 1e-9) * XtX.diagonal()[:d].mean()
    # Solve for A = [I + W^T; b^T] with the penalty on (A - I): weight decay toward the identity.
    eye = torch.zeros(d + 1, d, dtype=XtX.dtype, device=XtX.device)
    eye[:d] = torch.eye(d, dtype=XtX.dtype, device=XtX.device)
    A = torch.linalg.solve(_ridged(XtX, lam), XtY + lam * eye)
    return (A[:d] - eye[:d]).T.contiguous(), A[d].clone()


def _closed_form(stats: _Stats, readout: _Readout, targets: _Targets, settings: FitSettings,
                 ckpt: Optional["_Checkpoint"]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    saved = ckpt.lens(readout.device) if ckpt is not None else None
    if saved is not None:
        return saved  # the latest phase's: a resumed refinement goes on from its layers_refined
    L, d = stats.XtY.shape[0], stats.XtY.shape[2]
    check = stats.val[:, :_CHECK_TOKENS]
    weight = torch.zeros(L, d, d, dtype=torch.float64, device=readout.device)
    bias = torch.zeros(L, d, dtype=torch.float64, device=readout.device)
    chosen, val_kl = [], []
    for layer in range(L):
        best = None
        for alpha in settings.ridge:
            W, b = _solve_ridge(stats.XtX[layer], stats.XtY[layer], alpha)
            if len(settings.ridge) == 1:
                best = (0.0, alpha, W, b)
                break
            k = _kl(readout, check[layer], W.float(), b.float(), targets.log_p_k, working=True)
            if not math.isfinite(k):
                raise TunedLensFitError(
                    f"the validation KL of the closed-form translator of layer {layer} (ridge {alpha}) is "
                    f"{k}; the normal equations are ill-conditioned. Pass larger ridge values, e.g. ridge=(0.1, 1.0)."
                )
            if best is None or k < best[0]:
                best = (k, alpha, W, b)
        weight[layer], bias[layer] = best[2], best[3]
        chosen.append(best[1])
        val_kl.append(_kl(readout, check[layer, :_FULL_CHECK_TOKENS], best[2].float(), best[3].float(), targets.log_p))
    report = {"ridge_chosen": chosen, "val_kl_closed_form": val_kl}
    if not all(math.isfinite(k) for k in val_kl):
        bad = [i for i, k in enumerate(val_kl) if not math.isfinite(k)]
        raise TunedLensFitError(
            f"the closed-form translators of layers {bad} give a non-finite validation KL. Pass larger ridge "
            "values, e.g. ridge=(0.1, 1.0), or check the model's activations."
        )
    if ckpt is not None:
        ckpt.save_lens("closed_form", weight, bias, report, layers_done=L)
    return weight, bias, report


# ---------------------------------------------------------------------- phase 3: refinement
def _gauss_newton_stats(readout: _Readout, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, tgt: _Targets,
                        gain: torch.Tensor, chunk: int = 1024):
    """``(loss, G [d, d+1], F [d, d])`` of the working-vocabulary KL at ``(W, b)``: ``G`` the gradient w.r.t.
    ``[W | b]``, ``F`` the softmax's Gauss-Newton matrix through the norm (``J ~ diag(gain) / rms``), row mean."""
    d, dev, N, W_k = x.shape[1], x.device, x.shape[0], readout.W_k
    G = torch.zeros(d, d + 1, dtype=torch.float64, device=dev)
    q_sum = torch.zeros(W_k.shape[1], dtype=torch.float64, device=dev)
    M = torch.zeros(d, d, dtype=torch.float64, device=dev)
    loss = torch.zeros((), dtype=torch.float64, device=dev)
    ctx = current_context()
    for ci, s in enumerate(range(0, N, chunk)):
        if ci % ctx.world_size != ctx.rank:
            continue  # under torchrun each rank takes every world_size-th chunk; the sums are reduced below
        xs = x[s : s + chunk]
        h = translate_rows(xs, W, b)
        lq = torch.log_softmax(readout.logits(readout.norm(h), working=True), -1)
        q = lq.exp()
        p, lp = tgt.p_k[s : s + chunk], tgt.log_p_k[s : s + chunk]
        loss += (p * (lp - lq)).sum(dtype=torch.float64)
        m = q @ W_k.T  # E_q[unembedding], [rows, d]
        gh, scale = readout.norm_vjp(h, m - tgt.u_k[s : s + chunk])
        # Chunk products in float32 (these are curvature and gradient estimates), sums in float64.
        xt = torch.cat([xs, torch.ones(xs.shape[0], 1, device=dev)], 1)
        G += (gh.T @ xt).double()
        q_sum += (q / scale.pow(2)).sum(0).double()
        ms = m / scale
        M += (ms.T @ ms).double()
    if ctx.distributed:
        for t in (G, q_sum, M, loss):
            all_reduce_sum(t)
    G /= N
    Wd = W_k.double()
    F = (Wd * q_sum) @ Wd.T - M
    g = gain.double()
    F = g[:, None] * F * g[None, :] / N
    return float(loss) / N, G, F


def _refine(stats: _Stats, readout: _Readout, val_t: _Targets, ref_t: Optional[_Targets], settings: FitSettings,
            weight: torch.Tensor, bias: torch.Tensor, report: dict, ckpt: Optional["_Checkpoint"], progress: bool):
    L, d = weight.shape[0], weight.shape[1]
    if ref_t is None:
        report["refined"] = [False] * L
        return weight, bias, report
    start_layer = int(report.get("layers_refined", 0))
    weight, bias = weight.clone(), bias.clone()
    check = stats.val[:, :_CHECK_TOKENS]
    gain = readout.access.final_norm_gain().to(readout.device)
    report.setdefault("val_kl_refined", list(report["val_kl_closed_form"]))
    report.setdefault("refined", [False] * L)
    report.setdefault("train_kl_refine", [None] * L)
    report["refine_vocab_mass"] = float(val_t.log_p[:, readout.vocab].exp().sum(-1).mean())
    bar = tqdm(total=(L - start_layer) * settings.refine_steps, desc="tuned lens: refining on KL",
               disable=not (progress and current_context().is_main))
    try:
        for layer in range(start_layer, L):
            x, xv = stats.refine[layer], check[layer]
            last_good = ("" if ckpt is None else
                         f"The last good checkpoint (layers 0..{layer - 1} refined) is kept in {ckpt.folder}. ")
            Sx = stats.XtX[layer] / stats.n
            Sx_damped = _ridged(Sx, Sx.diagonal()[:d].mean())
            W, b = weight[layer].float(), bias[layer].float()
            cur_val = _kl(readout, xv, W, b, val_t.log_p_k, working=True)
            train_kl = None
            for step in range(settings.refine_steps):
                train_kl, G, F = _gauss_newton_stats(readout, x, W, b, ref_t, gain)
                if not (math.isfinite(train_kl) and torch.isfinite(G).all() and torch.isfinite(F).all()):
                    raise TunedLensFitError(
                        f"the KL loss became {train_kl} at layer {layer}, refinement step {step} (non-finite loss, "
                        f"gradient or curvature). {last_good}Fix: pass refine_steps=0 to keep the closed-form lens, "
                        "or a larger damping; check the model's activations for overflow (a half-precision model?)."
                    )
                lam_f = settings.damping * F.diagonal().mean().clamp_min(1e-30)
                F_damped = F + lam_f * torch.eye(d, dtype=torch.float64, device=F.device)
                delta = torch.linalg.solve(F_damped, G)  # F^-1 G
                delta = torch.linalg.solve(Sx_damped, delta.T).T  # F^-1 G Sx^-1
                best = None
                for eta in (1.0, 0.5, 0.25):
                    W2, b2 = W - eta * delta[:, :d].float(), b - eta * delta[:, d].float()
                    k = _kl(readout, xv, W2, b2, val_t.log_p_k, working=True)
                    if math.isfinite(k) and (best is None or k < best[0]):
                        best = (k, W2, b2)
                bar.update(1)
                bar.set_postfix(layer=layer, train_kl=f"{train_kl:.3f}", val_kl=f"{cur_val:.3f}")
                if best is None or best[0] >= cur_val:
                    bar.update(settings.refine_steps - step - 1)
                    break
                cur_val, W, b = best
            # Keep the refinement only where it beats the closed form on the full vocabulary.
            full = _kl(readout, xv[:_FULL_CHECK_TOKENS], W, b, val_t.log_p)
            if not math.isfinite(full):
                raise TunedLensFitError(f"the validation KL of layer {layer} became {full} after refinement. "
                                        f"{last_good}Fix: pass refine_steps=0 or a larger damping.")
            if full < report["val_kl_closed_form"][layer]:
                weight[layer], bias[layer] = W.double(), b.double()
                report["val_kl_refined"][layer] = full
                report["refined"][layer] = True
            report["train_kl_refine"][layer] = train_kl
            report["layers_refined"] = layer + 1
            done = report["val_kl_refined"][: layer + 1]
            bar.set_postfix(layer=layer, mean_val_kl=f"{sum(done) / len(done):.3f}")
            if ckpt is not None:
                ckpt.save_lens("refine", weight, bias, report, layers_done=layer + 1)
    finally:
        bar.close()
    return weight, bias, report


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
