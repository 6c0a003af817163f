"""The tuned-lens fit's numerics: closed-form ridge translators, then Gauss-Newton steps on the KL.

:func:`~tl_latentspaces.fitting.fit_tuned_lens` collects :class:`FitStats`, then calls :func:`choose_targets`,
:func:`closed_form` and :func:`refine`; the refinement scores a working vocabulary (the tokens with the most
final probability mass) through :class:`WorkingReadout`.

``ckpt``, where given, is the fit's checkpoint (``lens()``, ``save_lens(...)``, ``folder``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from tl_latentspaces.distributed import all_reduce_sum, current_context
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.translators import translate_rows

__all__ = ["FitSettings", "FitStats", "TunedLensFitError", "WorkingReadout", "choose_targets", "closed_form",
           "gauss_newton_stats", "refine"]

_CHECK_TOKENS = 512  # validation positions that choose ridge and step sizes (working vocabulary)
_FULL_CHECK_TOKENS = 128  # of those, the ones whose full-vocabulary KL decides what is kept
_VOCAB_TOKENS = 1024  # positions whose final distributions choose the working vocabulary


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


@dataclass
class FitStats:
    """What collection keeps: float64 normal equations and float32 activation subsets."""

    XtX: torch.Tensor  # [L, d+1, d+1] float64
    XtY: torch.Tensor  # [L, d+1, d] float64
    n: int  # training positions accumulated
    val: torch.Tensor  # [L+1, n_val_pos, d] float32
    refine: torch.Tensor  # [L+1, n_ref_pos, d] float32
    n_excluded: int


# ---------------------------------------------------------------------- norm and scores
class WorkingReadout:
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
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            z = (n @ W).float()
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


def _restricted_targets(readout: WorkingReadout, final: torch.Tensor, full_rows: int = 0, chunk: int = 512) -> _Targets:
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


def choose_targets(readout: WorkingReadout, stats: FitStats, settings: FitSettings,
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


def _kl(readout: WorkingReadout, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, log_p: torch.Tensor,
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
    eye = torch.eye(d + 1, d, dtype=XtX.dtype, device=XtX.device)  # [I; 0]
    A = torch.linalg.solve(_ridged(XtX, lam), XtY + lam * eye)
    return (A[:d] - eye[:d]).T.contiguous(), A[d].clone()


def closed_form(stats: FitStats, readout: WorkingReadout, targets: _Targets, settings: FitSettings,
                ckpt: Optional[Any]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Per layer, the ridge translator whose working-vocabulary validation KL is lowest, and the report."""
    saved = ckpt.lens(readout.device) if ckpt is not None else None
    if saved is not None:
        return saved  # the latest phase's: a resumed refinement goes on from its layers_refined
    L, d = stats.XtY.shape[0], stats.XtY.shape[2]
    check = stats.val[:, :_CHECK_TOKENS]
    weight = torch.zeros(L, d, d, dtype=torch.float64, device=readout.device)
    bias = torch.zeros(L, d, dtype=torch.float64, device=readout.device)
    chosen, val_kl = [], []
    single = len(settings.ridge) == 1  # nothing to choose: no validation KL
    for layer in range(L):
        best = None
        for alpha in settings.ridge:
            W, b = _solve_ridge(stats.XtX[layer], stats.XtY[layer], alpha)
            k = 0.0 if single else _kl(readout, check[layer], W.float(), b.float(), targets.log_p_k,
                                       working=True)
            if not math.isfinite(k):
                raise TunedLensFitError(
                    f"the validation KL of the closed-form translator of layer {layer} (ridge {alpha}) is "
                    f"{k}; the normal equations are ill-conditioned. Pass larger ridge values, e.g. ridge=(0.1, 1.0)."
                )
            if best is None or k < best[0]:
                best = (k, alpha, W, b)
        _, alpha, W, b = best
        weight[layer], bias[layer] = W, b
        chosen.append(alpha)
        val_kl.append(_kl(readout, check[layer, :_FULL_CHECK_TOKENS], W.float(), b.float(), targets.log_p))
    report = {"ridge_chosen": chosen, "val_kl_closed_form": val_kl}
    bad = [i for i, k in enumerate(val_kl) if not math.isfinite(k)]
    if bad:
        raise TunedLensFitError(
            f"the closed-form translators of layers {bad} give a non-finite validation KL. Pass larger ridge "
            "values, e.g. ridge=(0.1, 1.0), or check the model's activations."
        )
    if ckpt is not None:
        ckpt.save_lens("closed_form", weight, bias, report, layers_done=L)
    return weight, bias, report


# ---------------------------------------------------------------------- phase 3: refinement
def gauss_newton_stats(readout: WorkingReadout, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, tgt: _Targets,
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


def refine(stats: FitStats, readout: WorkingReadout, val_t: _Targets, ref_t: Optional[_Targets], settings: FitSettings,
           weight: torch.Tensor, bias: torch.Tensor, report: dict, ckpt: Optional[Any], progress: bool):
    """Gauss-Newton steps per layer from the closed form, kept where the full-vocabulary KL improves."""
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
    with tqdm(total=(L - start_layer) * settings.refine_steps, desc="tuned lens: refining on KL",
              disable=not (progress and current_context().is_main)) as bar:
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
                train_kl, G, F = gauss_newton_stats(readout, x, W, b, ref_t, gain)
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
    return weight, bias, report
