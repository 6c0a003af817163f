"""Hook sessions: add hooks to a model's hook points and remove exactly those.

TransformerLens's own cleanup (``reset_hooks()``, ``run_with_hooks``, the bridge's ``hooks()``) removes
every non-permanent hook it touches, the user's included. A :class:`HookSession` removes only the hooks
it added, whatever happens; its captures see an activation after every other hook on the point.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from tl_latentspaces.checks import warn_user
from tl_latentspaces.model import ModelAccess

__all__ = ["HookSession", "ResidualCollector", "hook_counts", "readout_hook_names"]

#: The first hook point of every forward pass on tokens: its input is the raw token embedding.
EMBED_HOOK = "hook_embed"


def hook_counts(model: Any) -> dict[str, int]:
    """Forward hooks and pre-hooks on every hook point of ``model`` (for hygiene checks)."""
    counts = {}
    seen: set[int] = set()
    for name, hp in model.hook_dict.items():
        if id(hp) in seen:  # bridge aliases share one HookPoint; count it once
            continue
        seen.add(id(hp))
        counts[name] = len(hp._forward_hooks) + len(hp._forward_pre_hooks)
    return counts


def readout_hook_names(access: ModelAccess) -> list[str]:
    """The hook points between the last residual and the logits (the final norm's and the unembedding's),
    one name per point (bridge aliases left out)."""
    seen: set[int] = set()
    out = []
    for name, hp in access.hook_dict.items():
        if name.startswith(("ln_final.", "unembed.")) and id(hp) not in seen:
            seen.add(id(hp))
            out.append(name)
    return out


class _StopForward(Exception):
    """Ends a forward pass in :meth:`HookSession.forward_until`."""


class HookSession:
    """Adds hooks to the hook points of a :class:`ModelAccess`'s model and removes exactly what it added."""

    def __init__(self, access: ModelAccess):
        self.access = access
        self._added: list[tuple[Any, Any]] = []  # (hook point, TransformerLens handle)
        self._handles: list[Any] = []  # PyTorch RemovableHandles of capture and input hooks

    def add(self, name: str, fn: Callable[..., Optional[torch.Tensor]]) -> None:
        """Register ``fn(activation, hook=...)`` on the hook point ``name`` as TransformerLens does, after the
        hooks already there (inside ``fn``, ``hook.name`` may be a bridge-native alias)."""
        hp = self.access.hook_point(name)
        before = {id(h) for h in hp.fwd_hooks}
        hp.add_hook(fn, dir="fwd")
        new = [h for h in hp.fwd_hooks if id(h) not in before]
        if len(new) != 1:  # pragma: no cover - guards against an unknown TransformerLens change
            for h in new:
                self._remove(hp, h)
            raise RuntimeError(f"registering one hook on {name!r} added {len(new)} entries to its fwd_hooks; "
                               "this TransformerLens version is not supported.")
        self._added.append((hp, new[0]))

    def capture(self, name: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(activation)`` with the activation at ``name`` after every other hook there (``fn`` must
        not change it): a PyTorch forward hook moved last at every call, outside the point's ``fwd_hooks``
        so that TransformerLens's cleanup inside a user's ``run_with_hooks`` cannot remove it."""
        hp = self.access.hook_point(name)
        conversion = getattr(hp, "hook_conversion", None)

        def read(module: Any, args: Any, output: Any) -> None:
            fn(conversion.convert(output) if conversion is not None else output)

        handle = hp.register_forward_hook(read)
        self._handles.append(handle)
        key = handle.id

        def last(module: Any, args: Any) -> None:
            if key in module._forward_hooks:
                module._forward_hooks.move_to_end(key)

        self._handles.append(hp.register_forward_pre_hook(last))

    def watch_input(self, name: str, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(activation)`` with what flows *into* ``name``, before any hook there edits it."""
        hp = self.access.hook_point(name)
        self._handles.append(hp.register_forward_pre_hook(lambda module, args: fn(args[0])))

    def forward_until(self, ids: torch.Tensor, name: str) -> None:
        """Run the model's own forward pass on ``ids`` and end it after every hook on ``name`` (captures
        registered first included); later points, the final norm and the logits are never computed."""

        def stop(activation: torch.Tensor) -> None:
            raise _StopForward

        self.capture(name, stop)
        with contextlib.suppress(_StopForward):
            self.access.forward(ids)

    @staticmethod
    def _remove(hp: Any, handle: Any) -> None:
        handle.hook.remove()  # idempotent: TransformerLens may have removed it already
        hp.fwd_hooks[:] = [h for h in hp.fwd_hooks if h is not handle]

    def remove(self) -> None:
        """Remove every hook this session added, newest first, and nothing else."""
        while self._handles:
            self._handles.pop().remove()
        while self._added:
            hp, handle = self._added.pop()
            self._remove(hp, handle)

    def __enter__(self) -> "HookSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _Pass:
    """One forward pass as a collector sees it: begun at the token embedding, complete once every site fired."""

    def __init__(self, seq: int, expected: bool):
        self.seq = seq  # passes in the order they began
        self.expected = expected  # on the expected tokens: its activations are kept
        self.acts: dict[str, Optional[torch.Tensor]] = {}
        self.changed_readout: list[str] = []  # hook points after the last residual that a hook changed


class ResidualCollector:
    """Captures, through ``session``, a detached copy of the activation at each hook point of ``names``
    (``{label: hook_name}``) after every hook there, and :meth:`stack` returns the last complete pass.

    A pass begins when the token embedding is computed and is complete once every site has fired. Passes
    nest: one run inside a hook of another (a clean run fetched mid-pass, say) keeps its own activations,
    and the outer pass goes on where it was. With ``expect`` (``[batch, pos]`` token ids), passes on other
    tokens (a nested session's) are ignored, and so is whatever runs outside a pass begun at the embedding
    (``start_at_layer``, or TransformerLens 2's ``generate``, which skips ``hook_embed``). With ``expect``,
    :meth:`stack` also warns when a hook changed the final norm or the unembedding in the pass it returns:
    lenses apply the model's own final norm and ``W_U`` to the residuals, so such a change is not in them."""

    def __init__(self, session: HookSession, names: dict[str, str], *, expect: Optional[torch.Tensor] = None):
        self.names = dict(names)
        self._access = session.access
        self._expect = expect
        self._open: list[_Pass] = []  # passes begun and not complete, innermost last
        self._done: Optional[_Pass] = None  # the last complete pass on the expected tokens
        self._last: Optional[_Pass] = None  # the pass completed last, on any tokens
        self._seq = 0
        self._foreign: list[tuple[int, ...]] = []  # shapes of passes on other tokens
        self._tracks_passes = EMBED_HOOK in session.access.hook_dict
        if self._tracks_passes:
            session.watch_input(EMBED_HOOK, self._new_pass)
        for label, hook_name in self.names.items():
            session.capture(hook_name, self._make_capture(label))
        if expect is not None:
            for name in readout_hook_names(session.access):
                self._watch_readout(session, name)

    def _watch_readout(self, session: HookSession, name: str) -> None:
        """Note in the pass just completed whether the hooks on ``name`` changed its activation (compared
        only where a hook other than ours is registered, so that the logits are copied only then)."""
        hp = session.access.hook_point(name)
        held: list[torch.Tensor] = []

        def before(x: torch.Tensor) -> None:
            held[:] = [x.detach().clone()] if len(hp._forward_hooks) > 1 else []

        def after(y: torch.Tensor) -> None:
            if held and self._last is not None and not torch.equal(held.pop(), y):
                self._last.changed_readout.append(name)

        session.watch_input(name, before)
        session.capture(name, after)

    def _new_pass(self, embedding: Optional[torch.Tensor]) -> None:
        expected = embedding is None or self._expect is None or self._access.embeds_tokens(embedding, self._expect)
        if not expected:
            self._foreign.append(tuple(embedding.shape[:2]))
        self._seq += 1
        self._open.append(_Pass(self._seq, expected))

    def _make_capture(self, label: str) -> Callable[[torch.Tensor], None]:
        def capture(activation: torch.Tensor) -> None:
            if not self._open:
                if self._tracks_passes:
                    return  # no pass began at the embedding
                self._new_pass(None)  # a model without hook_embed: passes are told apart by their sites only
            current = self._open[-1]
            current.acts[label] = activation.detach().clone() if current.expected else None
            if len(current.acts) == len(self.names):
                self._open.pop()
                self._last = current
                if current.expected:
                    self._done = current

        return capture

    def stack(self, labels: list[str]) -> torch.Tensor:
        """The last complete pass's activations as ``[entry, batch, pos, d_model]``, in ``labels`` order.

        Raises:
            RuntimeError: If no forward pass ran on the expected tokens, or one that began after the last
                complete pass (and not inside it) did not reach every site.
            ValueError: If an activation holds NaN or inf.
        """
        expected = [p for p in self._open if p.expected]
        if self._expect is not None and self._tracks_passes and self._done is None and not expected:
            other = f" (the forward passes seen ran on inputs of shape {self._foreign})" if self._foreign else ""
            raise RuntimeError(f"no forward pass ran on the session's tokens{other}: run the model on session.tokens "
                               f"(shape {tuple(self._expect.shape)}) inside the with block.")
        broken = [p for p in expected if self._done is None or p.seq > self._done.seq]
        if self._done is None or broken:
            seen = broken[-1].acts if broken else {}
            names = [self.names[label] for label in labels if label not in seen]
            raise RuntimeError(f"no activation was captured at {names} in the last forward pass: it did not reach "
                               "these hook points (stop_at_layer, or an exception inside the pass). Run a complete "
                               "forward pass.")
        captured = self._done.acts
        if self._done.changed_readout:
            final = self.names[list(self.names)[-1]]
            warn_user(f"a hook changed {sorted(set(self._done.changed_readout))} in this pass, after the last residual "
                      "the lenses read: each lens applies the model's own final norm and unembedding to the residual "
                      "stream, so final_post and the KLs to final describe the unhooked readout, not this pass's "
                      f"logits. Fix: make the change on the residual stream ({final}) if the lenses should see it.")
        for label in labels:
            act = captured[label]
            if not torch.isfinite(act).all():
                bad = (~torch.isfinite(act)).nonzero()[0].tolist()
                raise ValueError(f"the residual stream holds NaN or inf at {label} ({self.names[label]}), first at "
                                 f"index {bad}. Check the model's weights and any hook that edits the stream before "
                                 "this layer.")
        return torch.stack([captured[label] for label in labels], dim=0)
