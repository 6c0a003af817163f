"""The alignment suite's entry points: :func:`alignment_suite` on a corpus, :func:`alignment_from_cache`.

Both check every argument before the first forward pass; ``standardize=True`` adds a pass for the spreads.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from tl_latentspaces.alignment.accumulator import AlignmentAccumulator
from tl_latentspaces.alignment.options import INT_DTYPES, Settings, check_rows_for_k, check_seq_len
from tl_latentspaces.alignment.results import AlignmentResult
from tl_latentspaces.checks import check_bool, check_cache, check_int, type_name
from tl_latentspaces.corpus import Corpus, default_corpus, tokenize_corpus
from tl_latentspaces.model import ModelAccess
from tl_latentspaces.runner import CorpusRunner
from tl_latentspaces.stats import Moments

__all__ = ["alignment_suite", "alignment_from_cache"]

_F64 = torch.float64
_EPS = torch.finfo(_F64).eps


class _Spread:
    """Corpus-runner consumer of ``standardize=True``'s first pass: every representation's per-dimension spread."""

    def __init__(self, access: ModelAccess, skip: int):
        self.W_E, self.skip, self.E = access.W_E.detach(), skip, len(access.stack_sites())
        self.moments = Moments(self.E + 1, variances=True)

    def update(self, ids: Tensor, stack: Tensor) -> None:
        with torch.no_grad():
            tok = ids[:, self.skip:].to(self.W_E.device).long()
            rows = torch.cat([stack[:, :, self.skip:].to(_F64), self.W_E[tok].to(_F64).unsqueeze(0)], 0)
            if not bool(torch.isfinite(rows).all()):
                raise ValueError("the residual stream holds NaN or inf; check the model and any hook that edits it.")
            self.moments.update(rows.reshape(self.E + 1, -1, rows.shape[-1]))

    def state_dict(self) -> Dict[str, Any]:
        return self.moments.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.moments.load_state_dict(state)

    def merge(self, other: "_Spread") -> "_Spread":
        self.moments.merge(other.moments)
        return self

    def scale(self) -> Tensor:
        """``[E + 1, d_model]`` spreads; a dimension that never varies keeps scale 1 (no division by zero)."""
        if self.moments.n < 2:
            raise ValueError(f"standardization needs at least 2 tokens to estimate a spread; saw {self.moments.n}.")
        std = torch.sqrt(torch.stack(self.moments.sq_sums) / self.moments.n)
        floor = 1e3 * _EPS * std.amax(-1, keepdim=True)
        return torch.where(std > floor, std, torch.ones_like(std)).cpu()


def _run(
    access: ModelAccess, feed: Callable[[Callable[[], Any]], Any], *, standardize: bool, settings: Settings,
    n_null_samples: int, seed: int, progress: bool,
) -> AlignmentResult:
    """Both passes through ``feed``, which streams every batch into ``factory()`` and returns it."""
    scale = feed(lambda: _Spread(access, settings.skip_positions)).scale() if standardize else None
    acc = AlignmentAccumulator(access, standardize_scale=scale, **dataclasses.asdict(settings))
    return feed(acc.empty).result(n_null_samples=n_null_samples, seed=seed, progress=progress)


def _check_run(*, standardize: bool, batch_size: int, n_null_samples: int, seed: int, progress: bool) -> None:
    check_bool(standardize, "standardize")
    check_bool(progress, "progress")
    check_int(batch_size, "batch_size", minimum=1)
    check_int(n_null_samples, "n_null_samples", minimum=2, why=" (a standard deviation needs 2 samples)")
    check_int(seed, "seed", minimum=0)


def _cache_entries(access: ModelAccess, cache: Any, ids: Tensor, names: Dict[str, str]) -> List[Tensor]:
    check_cache(cache)
    acts = []
    for label, name in names.items():
        try:
            act = cache[name]
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"the cache has no activation {name!r} (needed for {label}). Fix: cache the residual "
                "stream, e.g. model.run_with_cache(tokens, names_filter=lambda n: 'resid' in n)."
            ) from err
        if not isinstance(act, Tensor) or act.ndim != 3 or tuple(act.shape) != (*ids.shape, access.d_model):
            got = tuple(act.shape) if isinstance(act, Tensor) else type_name(act)
            raise ValueError(
                f"cached {name} has shape {got}, but tokens {tuple(ids.shape)} need "
                f"{(*ids.shape, access.d_model)}. Fix: pass the token ids the cache was made from (mind BOS)."
            )
        acts.append(act.detach())
    return acts


def _as_ids(tokens: Any, access: ModelAccess) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dtype not in INT_DTYPES:
        raise TypeError(
            f"tokens must be an integer tensor [batch, seq] of the ids the cache was made from, got "
            f"{type_name(tokens) if not isinstance(tokens, Tensor) else tokens.dtype}."
        )
    ids = tokens.unsqueeze(0) if tokens.ndim == 1 else tokens
    if ids.ndim != 2 or ids.numel() == 0:
        raise ValueError(f"tokens must be a non-empty [batch, seq] tensor, got shape {tuple(tokens.shape)}.")
    return ids.long()


def alignment_suite(
    model: Any, corpus: Optional[Corpus] = None, *, k: Optional[int] = None, max_tokens: Optional[int] = 16384,
    seq_len: Optional[int] = None, prepend_bos: bool = True, batch_size: int = 8, skip_positions: int = 2,
    center: bool = True, standardize: bool = False, cka_block_sequences: int = 4, layer_cka_biased: bool = False,
    rank_every: int = 4, n_null_samples: int = 200, seed: int = 0, progress: bool = True,
) -> AlignmentResult:
    """Run the whole alignment suite on a model over a corpus, streaming the residual stream.

    The corpus runs through the model's own forward pass (the user's hooks fire as usual); no
    activation outlives its batch. ``docs/alignment.md`` gives the measurements behind the defaults.

    Args:
        model: A ``HookedTransformer`` or ``TransformerBridge`` in eval mode.
        corpus: Text, a list of texts, file paths (``.txt``/``.jsonl``) or a ``[n_seq, seq_len]``
            token tensor; default: the held-out split of the offline default corpus.
        k: Subspace dimension of the angle and variance analyses; default ``d_model // 8``.
        max_tokens: Token budget (whole sequences, BOS included); None reads the whole corpus.
        seq_len: Tokens per sequence; default 128 for text, the width of a token tensor.
        prepend_bos: Start every text sequence with BOS (ignored for a token tensor).
        batch_size: Sequences per forward pass (memory only: results do not depend on it).
        skip_positions: Leading positions of every sequence left out of every statistic (default 2:
            BOS and the next token, whose massive activations would dominate every covariance).
        center: Centre before principal subspaces, variance fractions and Procrustes.
        standardize: z-score every representation per dimension before CKA and Procrustes (a
            first pass for the spreads doubles the forward passes).
        cka_block_sequences: Sequences per block of the debiased CKA estimator.
        layer_cka_biased: Also compute the full biased layer-by-layer CKA (1.4 GB for the default model).
        rank_every: Compute the embedding-lens rank at every ``rank_every``-th kept position.
        n_null_samples: Haar-random subspaces in the null baselines.
        seed: Seed of the null baselines.
        progress: Show tqdm progress bars.

    Raises:
        ValueError: a model in training mode, ``k`` larger than ``d_model`` or than the tokens can
            support, sequences too short for the debiased estimator, a corpus too small, NaN in the
            residual stream (naming the entry), or any bad option.

    Example:
        >>> import tl_latentspaces as tll
        >>> result = tll.alignment_suite(model, max_tokens=4096)  # doctest: +SKIP
        >>> result.to_dataframe().loc["0_pre", ["cka_embed", "cos_mean", "rank_q50"]]  # doctest: +SKIP
    """
    access = ModelAccess.of(model)
    access.require_eval("alignment_suite")
    settings = Settings.check(
        access, k=k, skip_positions=skip_positions, center=center, cka_block_sequences=cka_block_sequences,
        layer_cka_biased=layer_cka_biased, rank_every=rank_every,
    )
    _check_run(standardize=standardize, batch_size=batch_size, n_null_samples=n_null_samples, seed=seed,
               progress=progress)
    if max_tokens is not None:
        max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
    if corpus is None:
        corpus = default_corpus("heldout")
    if seq_len is None:
        seq_len = int(corpus.shape[1]) if isinstance(corpus, Tensor) and corpus.ndim == 2 else 128
    seq_len = check_int(
        seq_len, "seq_len", minimum=2, maximum=access.n_ctx, why=f" (the model's n_ctx={access.n_ctx})"
    )
    check_seq_len(seq_len, settings.skip_positions)
    seqs = tokenize_corpus(access, corpus, seq_len=seq_len, prepend_bos=prepend_bos, max_tokens=max_tokens)
    n_rows = seqs.shape[0] * (seq_len - settings.skip_positions)
    check_rows_for_k(n_rows, settings.k, settings.center, "in this corpus")
    runner = CorpusRunner(access, seqs, seq_len=seq_len, batch_size=batch_size, progress=progress,
                          desc="alignment suite")
    return _run(
        access, lambda factory: runner.run({"alignment": factory})["alignment"], standardize=standardize,
        settings=settings, n_null_samples=n_null_samples, seed=seed, progress=progress,
    )


def alignment_from_cache(
    model: Any, cache: Any, tokens: Int[Tensor, "batch seq"], *, k: Optional[int] = None, batch_size: int = 8,
    skip_positions: int = 2, center: bool = True, standardize: bool = False, cka_block_sequences: int = 4,
    layer_cka_biased: bool = False, rank_every: int = 4, n_null_samples: int = 200, seed: int = 0,
    progress: bool = False, verify_cache: bool = True,
) -> AlignmentResult:
    """Run the alignment suite on an ``ActivationCache`` the user already has (no forward pass).

    The cache must hold the residual stream at every ``stack_sites()`` entry (every ``resid_pre`` and
    the last ``resid_post``) for ``tokens``, unpadded: every position after ``skip_positions`` is used.
    Options as in :func:`alignment_suite`; a cache of other tokens is refused unless ``verify_cache=False``.

    Example:
        >>> _, cache = model.run_with_cache(tokens)  # doctest: +SKIP
        >>> tll.alignment_from_cache(model, cache, tokens, k=8).to_dataframe()  # doctest: +SKIP
    """
    access = ModelAccess.of(model)
    settings = Settings.check(
        access, k=k, skip_positions=skip_positions, center=center, cka_block_sequences=cka_block_sequences,
        layer_cka_biased=layer_cka_biased, rank_every=rank_every,
    )
    _check_run(standardize=standardize, batch_size=batch_size, n_null_samples=n_null_samples, seed=seed,
               progress=progress)
    ids = _as_ids(tokens, access)
    check_seq_len(ids.shape[1], settings.skip_positions)
    check_rows_for_k(ids.shape[0] * (ids.shape[1] - settings.skip_positions), settings.k, settings.center, "in tokens",
                     more="cache a longer or larger batch")
    names = dict(access.stack_sites())
    acts = _cache_entries(access, cache, ids, names)
    if check_bool(verify_cache, "verify_cache"):
        access.check_cache_tokens(cache, ids)

    def feed(factory: Callable[[], Any]) -> Any:
        consumer = factory()
        # One batch at a time, so the float64 working copies stay bounded whatever the cache size.
        for start in range(0, ids.shape[0], batch_size):
            stop = start + batch_size
            consumer.update(ids[start:stop], torch.stack([act[start:stop] for act in acts], 0))
        return consumer

    return _run(
        access, feed, standardize=standardize, settings=settings, n_null_samples=n_null_samples, seed=seed,
        progress=progress,
    )
