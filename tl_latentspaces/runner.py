"""The corpus runner: stream a corpus through a model once, feeding any number of statistics.

A *consumer* is any object with ``update(ids, stack)``, ``state_dict()``, ``load_state_dict(state)`` and
``merge(other)`` (``AlignmentAccumulator``, for instance).

Example:
    >>> out = CorpusRunner(model, texts).run({"align": AlignmentAccumulator(model).empty})  # doctest: +SKIP
    >>> out["align"].result().to_dataframe()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from tqdm.auto import tqdm

from tl_latentspaces.checkpoints import checkpoint_path, load_checkpoint, save_checkpoint
from tl_latentspaces.checks import check_int
from tl_latentspaces.corpus import tokenize_corpus
from tl_latentspaces.distributed import current_context, reduce_accumulator, shard_batches
from tl_latentspaces.hooks import HookSession, ResidualCollector
from tl_latentspaces.model import ModelAccess, ModelIdentity

__all__ = ["CorpusRunner", "stream_residuals"]

Factory = Callable[[], Any]


class CorpusRunner:
    """Streams a corpus through a model in batches, feeding consumers; resumable and data-parallel.

    Under ``torchrun`` each rank takes every ``world_size``-th batch and the states are merged.

    Args:
        corpus: Texts, file paths, a ``datasets`` object, or a ``[n, seq_len]`` token tensor; read lazily up
            to ``max_tokens`` (:func:`~tl_latentspaces.corpus.iter_texts`).
        seq_len: Tokens per sequence (BOS included).
        seed: Fixes the batch order when ``shuffle``.
        checkpoint_dir: Save progress here every ``checkpoint_every`` batches (``runner-rank{r}.pt``, one per
            process) and resume from it, refusing another model, dtype or mode.
        desc: The progress bar's label.
    """

    def __init__(self, model: Any, corpus: Any, *, seq_len: int = 128, batch_size: int = 8,
                 max_tokens: Optional[int] = None, prepend_bos: bool = True, seed: int = 0, shuffle: bool = False,
                 checkpoint_dir: Union[str, Path, None] = None, checkpoint_every: int = 10, progress: bool = True,
                 desc: str = "corpus"):
        self.access = ModelAccess.of(model)
        self.access.require_eval("the corpus runner")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.checkpoint_every = check_int(checkpoint_every, "checkpoint_every", minimum=1)
        sequences = tokenize_corpus(self.access, corpus, seq_len=seq_len, prepend_bos=prepend_bos,
                                    max_tokens=max_tokens)
        if shuffle:
            order = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(seed))
            sequences = sequences[order]
        self.sequences = sequences
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.progress = progress
        self.desc = desc
        digest = hashlib.sha256(sequences.numpy().tobytes())
        digest.update(f"{self.batch_size}".encode())
        self.fingerprint = digest.hexdigest()[:16]

    @cached_property
    def identity(self) -> ModelIdentity:
        """The model's identity (its weights are hashed once)."""
        return ModelIdentity.of(self.access)

    @property
    def n_batches(self) -> int:
        """Batches in one pass over the packed corpus (the last may be short)."""
        return (self.sequences.shape[0] + self.batch_size - 1) // self.batch_size

    def batch(self, index: int) -> torch.Tensor:
        """The ``[batch_size, seq_len]`` token ids of batch ``index`` (fewer rows for the last batch)."""
        return self.sequences[index * self.batch_size : (index + 1) * self.batch_size]

    def _save(self, rank: int, done: int, consumers: dict[str, Any]) -> None:
        """One file per rank holding every consumer's state and the batch count, replaced atomically."""
        meta = {"fingerprint": self.fingerprint, "done": done, "consumers": sorted(consumers),
                "world_size": current_context().world_size, "model": asdict(self.identity)}
        save_checkpoint(self.checkpoint_dir, "runner", rank, meta, {n: c.state_dict() for n, c in consumers.items()})

    def _load(self, rank: int, consumers: dict[str, Any]) -> int:
        saved = None if self.checkpoint_dir is None else load_checkpoint(self.checkpoint_dir, "runner", rank)
        if saved is None:
            return 0
        meta, states = saved
        path = checkpoint_path(self.checkpoint_dir, "runner", rank)
        try:
            recorded = ModelIdentity(**meta["model"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"the checkpoint {str(path)!r} does not record which model wrote it (an earlier "
                             "version of tl_latentspaces wrote it), so resuming it could mix two models. Pass "
                             "another checkpoint_dir, or delete it to start over.") from None
        recorded.require_same(self.identity, f"the checkpoint {str(path)!r}")
        if meta.get("fingerprint") != self.fingerprint or meta.get("consumers") != sorted(consumers):
            raise ValueError(
                f"the checkpoint {str(path)!r} belongs to another corpus, batch size or set of statistics; "
                "pass another checkpoint_dir or delete it to start over."
            )
        world = current_context().world_size
        if meta.get("world_size", 1) != world:
            raise ValueError(
                f"the checkpoint {str(path)!r} was written by a run of {meta.get('world_size', 1)} "
                f"process(es), and this run has {world}: each rank's share of the batches differs. "
                "Resume with the same number of processes, or pass another checkpoint_dir."
            )
        for name, consumer in consumers.items():
            consumer.load_state_dict(states[name])
        return int(meta["done"])

    def run(self, consumers: dict[str, Factory]) -> dict[str, Any]:
        """Stream the corpus once; ``consumers`` is ``{name: factory of a fresh consumer}``.

        Returns ``{name: consumer}``, merged across ranks.
        """
        if not consumers:
            raise ValueError("pass at least one consumer: {name: factory returning an accumulator}.")
        ctx = current_context()
        live = {name: factory() for name, factory in consumers.items()}
        mine = list(shard_batches(self.n_batches, ctx))
        done = self._load(ctx.rank, live)
        names = dict(self.access.stack_sites())
        todo = mine[done:]
        if todo:
            seqs = torch.cat([self.batch(i) for i in todo])
            stream = stream_residuals(self.access, seqs, names, batch_size=self.batch_size,
                                      progress=self.progress and ctx.is_main, desc=self.desc)
            for step, (ids, stack) in enumerate(stream, start=done + 1):
                for consumer in live.values():
                    consumer.update(ids, stack)
                if self.checkpoint_dir is not None and (step % self.checkpoint_every == 0 or step == len(mine)):
                    self._save(ctx.rank, step, live)
        for name, consumer in live.items():
            reduce_accumulator(consumer, consumers[name])
        return live


def stream_residuals(model: Any, sequences: torch.Tensor, hook_names: dict[str, str], *, batch_size: int = 8,
                     progress: bool = True,
                     desc: str = "residual stream") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``sequences`` through the model in batches and yield ``(ids, stack)`` per batch.

    ``stack`` is ``[entry, batch, seq_len, d_model]`` in ``hook_names`` order, captured inside the model's own
    forward pass (so the user's hooks act on it); the capture hooks are removed after every batch.
    """
    access = ModelAccess.of(model)
    access.require_eval("streaming the residual stream")
    labels = list(hook_names)
    final = access.site_name(access.n_layers - 1, "resid_post")
    stop_at = final if final in hook_names.values() else None
    n = sequences.shape[0]
    bar = tqdm(total=n * sequences.shape[1], desc=desc, unit="tok", disable=not progress)
    try:
        for start in range(0, n, batch_size):
            ids = sequences[start : start + batch_size]
            with HookSession(access) as session:
                collector = ResidualCollector(session, hook_names)
                with torch.no_grad():
                    if stop_at is not None:
                        session.forward_until(ids, stop_at)
                    else:
                        access.forward(ids)
            yield ids, collector.stack(labels)
            bar.update(ids.numel())
    finally:
        bar.close()
