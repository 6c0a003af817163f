"""Hook sessions: add forward hooks to a model's hook points and remove exactly those.

TransformerLens's own cleanup (``reset_hooks()``, the bridge's ``hooks()``, ``run_with_hooks``
and ``run_with_cache``) removes every non-permanent hook on the hook points it touches, the
user's own included. A :class:`HookSession` instead remembers each entry it appended to a hook
point's ``fwd_hooks`` and removes that entry alone, in a ``finally``, whatever happens: success,
an exception or a ``KeyboardInterrupt``. The user's hooks, permanent or not, stay registered.

Example:
    >>> with HookSession(ModelAccess(model)) as session:  # doctest: +SKIP
    ...     session.add("blocks.0.hook_resid_pre", lambda act, hook: None)
    ...     model(tokens)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from tl_latentspaces.model import ModelAccess

__all__ = ["HookSession", "ResidualCollector", "hook_counts"]

HookFn = Callable[..., Optional[torch.Tensor]]


def hook_counts(model: Any) -> dict[str, int]:
    """Number of forward hooks on every hook point of ``model`` (for hygiene checks)."""
    counts = {}
    seen: set[int] = set()
    for name, hp in model.hook_dict.items():
        if id(hp) in seen:  # bridge aliases share one HookPoint; count it once
            continue
        seen.add(id(hp))
        counts[name] = len(hp._forward_hooks)
    return counts


class HookSession:
    """Adds forward hooks through a model's hook points and removes exactly what it added.

    Args:
        access: The model to hook, as a :class:`ModelAccess`.
    """

    def __init__(self, access: ModelAccess):
        self.access = access
        self._added: list[tuple[Any, Any]] = []

    def add(self, name: str, fn: HookFn) -> None:
        """Register ``fn(activation, hook=...)`` on the hook point ``name``, after the user's hooks.

        Our hook runs last on that point, so it sees whatever the user's hooks there did.
        Inside ``fn`` the ``hook.name`` may be a bridge-native alias: keep the requested name in
        a closure if you need it.
        """
        hp = self.access.hook_point(name)
        before = {id(h) for h in hp.fwd_hooks}
        hp.add_hook(fn, dir="fwd")
        new = [h for h in hp.fwd_hooks if id(h) not in before]
        if len(new) != 1:  # pragma: no cover - guards against an unknown TransformerLens change
            for h in new:
                self._remove(hp, h)
            raise RuntimeError(
                f"registering one hook on {name!r} added {len(new)} entries to its fwd_hooks; "
                "this TransformerLens version is not supported."
            )
        self._added.append((hp, new[0]))

    @staticmethod
    def _remove(hp: Any, handle: Any) -> None:
        handle.hook.remove()  # idempotent: a handle TransformerLens already removed is fine
        for i, h in enumerate(hp.fwd_hooks):
            if h is handle:
                del hp.fwd_hooks[i]
                break

    def remove(self) -> None:
        """Remove every hook this session added, newest first, and nothing else."""
        while self._added:
            hp, handle = self._added.pop()
            self._remove(hp, handle)

    def __enter__(self) -> "HookSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class ResidualCollector:
    """Captures residual-stream activations at named hook points during the user's forward pass.

    Each capture hook returns nothing, so it never changes the forward pass; it stores a detached
    copy of what it saw, after any user hook registered before it on the same point.

    Args:
        session: The hook session that owns the capture hooks.
        names: ``{label: hook_name}`` of the sites to capture.
    """

    def __init__(self, session: HookSession, names: dict[str, str]):
        self.names = dict(names)
        self.captured: dict[str, torch.Tensor] = {}
        for label, hook_name in self.names.items():
            session.add(hook_name, self._make_hook(label))

    def _make_hook(self, label: str) -> HookFn:
        def capture(activation: torch.Tensor, hook: Any = None) -> None:
            self.captured[label] = activation.detach().clone()
            return None

        return capture

    def stack(self, labels: list[str]) -> torch.Tensor:
        """The captured activations as ``[entry, batch, pos, d_model]``, in ``labels`` order.

        Raises:
            RuntimeError: If a site did not fire (its hook was removed by other code, or the
                forward pass did not reach it).
            ValueError: If an activation holds NaN or inf (the message names the entry).
        """
        missing = [label for label in labels if label not in self.captured]
        if missing:
            raise RuntimeError(
                f"no activation was captured at {[self.names[m] for m in missing]}: the forward "
                "pass did not reach these hook points, or other code removed the lens's hooks "
                "(TransformerLens's hooks()/run_with_hooks/reset_hooks remove every hook on the "
                "points they touch). Run the forward pass inside the session without those."
            )
        for label in labels:
            act = self.captured[label]
            if not torch.isfinite(act).all():
                bad = (~torch.isfinite(act)).nonzero()[0].tolist()
                raise ValueError(
                    f"the residual stream holds NaN or inf at {label} ({self.names[label]}), "
                    f"first at index {bad}. Check the model's weights and any hook that edits "
                    "the stream before this layer."
                )
        return torch.stack([self.captured[label] for label in labels], dim=0)
