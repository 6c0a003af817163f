"""Model access: the one module that knows `HookedTransformer` from `TransformerBridge`.

Everything else in the package reads a model through :class:`ModelAccess`, so no other module
branches on the TransformerLens version. It gives:

* the residual-stream sites as hook names (``resid_pre`` of every layer, ``resid_mid``,
  ``resid_post``; the final pre-norm stream is the last layer's ``resid_post``) and their
  TransformerLens stack labels (``"0_pre"`` ... ``"final_post"``);
* the weights ``W_E``, ``W_pos`` (where there is one), ``W_U``, ``b_U``;
* the final normalization applied exactly as the model applies it, weights included, in float32
  and without firing any hook the user placed on ``ln_final``;
* tokenization with explicit BOS handling, identical on every TransformerLens line.

Example:
    >>> from tl_latentspaces.model import ModelAccess
    >>> access = ModelAccess(model)  # doctest: +SKIP
    >>> access.stack_sites()[:2]  # doctest: +SKIP
    [('0_pre', 'blocks.0.hook_resid_pre'), ('1_pre', 'blocks.1.hook_resid_pre')]
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import warnings
import zlib
from collections.abc import Mapping, Set
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int

__all__ = [
    "ModelAccess",
    "Tokens",
    "transformer_lens_version",
    "SITES",
    "pre_layer",
]

#: Residual-stream sites a lens can read, as TransformerLens names them.
SITES = ("resid_pre", "resid_mid", "resid_post")


def pre_layer(label: Any, n_layers: int) -> Optional[int]:
    """``l`` for a stack label ``"{l}_pre"`` of an ``n_layers`` model (see
    :meth:`ModelAccess.stack_sites`), else None (``"final_post"``, ``"{l}_mid"``, anything else)."""
    if isinstance(label, str) and label.endswith("_pre") and label[:-4].isdigit() and int(label[:-4]) < n_layers:
        return int(label[:-4])
    return None


def transformer_lens_version() -> tuple[int, ...]:
    """The installed TransformerLens version as a tuple of ints (there is no ``__version__``)."""
    try:
        raw = version("transformer-lens")
    except PackageNotFoundError:  # pragma: no cover - the package is a hard dependency
        raw = version("transformer_lens")
    parts = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _hooked_transformer_class() -> Optional[type]:
    # TransformerLens 4.x raises ImportError on this import; 2.x and 3.x have it.
    try:
        from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def _bridge_class() -> Optional[type]:
    # 2.x has no bridge at all.
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return None
    return TransformerBridge


@dataclass(frozen=True)
class Tokens:
    """A tokenized batch: right-padded ids and the mask of real (non-pad) positions.

    Attributes:
        ids: ``[batch, pos]`` token ids, right-padded.
        mask: ``[batch, pos]`` bool, True where the position holds a real token.
        prepend_bos: Whether a BOS token was prepended to each sequence.
    """

    ids: Int[torch.Tensor, "batch pos"]
    mask: torch.Tensor
    prepend_bos: bool


class TokenDecoder:
    """Token id -> text, cached, for result objects; keeps the tokenizer it decodes with.

    Views read ``tokenizer`` to show what a byte-level token holds when it is only part of a
    UTF-8 character (its text alone would be ``\\ufffd``).

    Attributes:
        tokenizer: The model's tokenizer, or None.
    """

    def __init__(self, tokenizer: Any, decode_token: Callable[[int], str]):
        self.tokenizer = tokenizer
        self._decode_token = decode_token
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        i = int(token_id)
        if i not in self._cache:
            self._cache[i] = self._decode_token(i)
        return self._cache[i]


class ModelAccess:
    """A read-only view of a TransformerLens model that hides the version differences.

    Args:
        model: A ``HookedTransformer`` (TransformerLens 2.x/3.x) or a ``TransformerBridge``
            (3.x/4.x), raw or in compatibility mode.

    Raises:
        TypeError: If ``model`` is neither kind.
    """

    def __init__(self, model: Any):
        ht_cls, bridge_cls = _hooked_transformer_class(), _bridge_class()
        if bridge_cls is not None and isinstance(model, bridge_cls):
            self.kind = "bridge"
        elif ht_cls is not None and isinstance(model, ht_cls):
            self.kind = "hooked"
        else:
            known = [c.__name__ for c in (ht_cls, bridge_cls) if c is not None]
            raise TypeError(
                f"expected a TransformerLens model ({' or '.join(known)}), got "
                f"{type(model).__module__}.{type(model).__name__}. Load one with "
                "tl_latentspaces.load_default_model(), TransformerBridge.boot_transformers(...) "
                "or HookedTransformer.from_pretrained(...)."
            )
        self.model = model
        self.cfg = model.cfg

    # ------------------------------------------------------------------ sizes and state
    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.cfg.n_layers)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return int(self.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        """Vocabulary size, as the unembedding has it (columns of ``W_U``)."""
        return int(self.W_U.shape[1])

    @property
    def n_ctx(self) -> int:
        """Longest input the model takes, in tokens."""
        return int(self.cfg.n_ctx)

    @property
    def name(self) -> str:
        """The model's name from its config (the class name when it has none)."""
        return str(getattr(self.cfg, "model_name", None) or type(self.model).__name__)

    @property
    def device(self) -> torch.device:
        """Where the model's unembedding lives; inputs are moved there."""
        return self.W_U.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (readouts are computed in float32 whatever it is)."""
        return self.W_U.dtype

    @property
    def compatibility_mode(self) -> bool:
        """Whether a bridge runs in compatibility mode (norm weights folded into ``W_U``)."""
        return bool(getattr(self.model, "compatibility_mode", False))

    def require_eval(self, operation: str) -> None:
        """Refuse a model in training mode: dropout would make every readout random."""
        if self.model.training:
            raise ValueError(
                f"{operation} needs the model in eval mode, but it is in training mode "
                "(dropout would change every readout). Call model.eval() first."
            )

    # ------------------------------------------------------------------ weights
    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        """The input embedding, one row per token."""
        return self.model.W_E

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
        """The unembedding, one column per token."""
        return self.model.W_U

    @property
    def b_U(self) -> Float[torch.Tensor, " d_vocab"]:
        """The unembedding bias (zeros when the model has none)."""
        b = getattr(self.model, "b_U", None)
        if b is None:
            return torch.zeros(self.W_U.shape[1], dtype=self.W_U.dtype, device=self.W_U.device)
        return b

    @property
    def W_pos(self) -> Optional[Float[torch.Tensor, "n_ctx d_model"]]:
        """The learned positional embedding, or None (rotary models, the 3.9 bridge's alias)."""
        if getattr(self.cfg, "positional_embedding_type", "standard") != "standard":
            return None
        pos_embed = getattr(self.model, "pos_embed", None)
        for owner in (pos_embed, self.model):
            if owner is None:
                continue
            try:
                w = getattr(owner, "W_pos")
            except (AttributeError, RuntimeError, NotImplementedError):
                continue
            if isinstance(w, torch.Tensor):
                return w
        return None

    def unembedding_fingerprint(self) -> str:
        """A short hash of ``W_U`` and ``b_U``: identifies the readout a saved lens was fitted for."""
        h = hashlib.sha256()
        for t in (self.W_U, self.b_U):
            data = t.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(data.shape)).encode())
            h.update(data.numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ hook sites
    @cached_property
    def hook_dict(self) -> dict[str, Any]:
        """Hook name -> ``HookPoint``, bridge aliases included."""
        return dict(self.model.hook_dict)

    def site_name(self, layer: int, site: str) -> str:
        """The TransformerLens hook name of ``site`` at ``layer`` (``blocks.{layer}.hook_{site}``)."""
        if site not in SITES:
            raise ValueError(f"unknown residual site {site!r}; valid sites are {list(SITES)}.")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer!r} is out of range: this model has layers 0..{self.n_layers - 1}."
            )
        return f"blocks.{layer}.hook_{site}"

    def stack_sites(self, incl_mid: bool = False) -> list[tuple[str, str]]:
        """The accumulated residual stack as ``(label, hook_name)`` pairs, TransformerLens order.

        Labels follow ``ActivationCache.accumulated_resid``: ``"{l}_pre"`` (and ``"{l}_mid"``) for
        every layer, then ``"final_post"`` for the last layer's ``resid_post`` (the stream the
        final norm reads).
        """
        out = []
        for layer in range(self.n_layers):
            out.append((f"{layer}_pre", self.site_name(layer, "resid_pre")))
            if incl_mid:
                out.append((f"{layer}_mid", self.site_name(layer, "resid_mid")))
        out.append(("final_post", self.site_name(self.n_layers - 1, "resid_post")))
        return out

    def hook_point(self, name: str) -> Any:
        """The ``HookPoint`` called ``name``; an unknown name is an error listing close matches."""
        hp = self.hook_dict.get(name)
        if hp is None:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.6)
            hint = f" Did you mean one of {close}?" if close else ""
            raise ValueError(
                f"this model has no hook point named {name!r}.{hint} "
                f"Valid names are listed by model.hook_dict ({len(self.hook_dict)} entries)."
            )
        return hp

    # ------------------------------------------------------------------ final norm
    @cached_property
    def _final_norm_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        norm_type = getattr(self.cfg, "normalization_type", None)
        ln_final = getattr(self.model, "ln_final", None)
        if self.kind == "bridge":
            # The wrapped Hugging Face / native module is what the model runs; it carries no
            # HookPoints, so calling it fires none of the user's hooks. A float32 copy reads
            # half-precision models in float32.
            original = getattr(ln_final, "_original_component", None) or getattr(
                ln_final, "original_component", None
            )
            if original is None:
                if norm_type is None or ln_final is None:
                    return lambda x: x
                raise ValueError(
                    f"cannot apply the final norm of {self.name}: ln_final is "
                    f"{type(ln_final).__name__} without an original component."
                )
            module = copy.deepcopy(original).to(torch.float32)
            module.requires_grad_(False)
            return module
        # HookedTransformer: recompute the norm from its parameters instead of calling the
        # module, whose hook_scale / hook_normalized would fire the user's hooks.
        eps = float(getattr(self.cfg, "eps", 1e-5))
        if norm_type is None or ln_final is None:
            return lambda x: x
        w = getattr(ln_final, "w", None)
        b = getattr(ln_final, "b", None)
        w = None if w is None else w.detach().to(torch.float32)
        b = None if b is None else b.detach().to(torch.float32)
        if norm_type in ("LN", "LNPre"):

            def layer_norm(x: torch.Tensor) -> torch.Tensor:
                x = x - x.mean(-1, keepdim=True)
                x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
                if w is not None:
                    x = x * w.to(x.device)
                if b is not None:
                    x = x + b.to(x.device)
                return x

            return layer_norm
        if norm_type in ("RMS", "RMSPre"):

            def rms_norm(x: torch.Tensor) -> torch.Tensor:
                x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
                if w is not None:
                    x = x * w.to(x.device)
                return x

            return rms_norm
        raise ValueError(
            f"cannot apply normalization_type={norm_type!r} of {self.name}; supported: "
            "LN, LNPre, RMS, RMSPre or None."
        )

    def final_norm(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        """Apply the model's final normalization (weights included) to ``x`` in float32."""
        return self._final_norm_fn(x.to(torch.float32))

    def final_norm_scale(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... 1"]:
        """The per-row scale the final norm divides by: ``sqrt(mean(h^2) + eps)``, after centring
        for LayerNorm; ones for a model without a final norm."""
        norm_type = getattr(self.cfg, "normalization_type", None)
        if norm_type is None:
            return torch.ones(*h.shape[:-1], 1, dtype=h.dtype, device=h.device)
        if str(norm_type).startswith("LN"):
            h = h - h.mean(-1, keepdim=True)
        return (h.pow(2).mean(-1, keepdim=True) + float(getattr(self.cfg, "eps", 1e-5))).sqrt()

    def final_norm_gain(self) -> Float[torch.Tensor, " d_model"]:
        """The final norm's per-feature gain (its weight; ones without a norm or when folded).

        Read off the norm itself, so LayerNorm, RMSNorm, folded (``LNPre``) and missing norms
        need no parameter names: for a zero-mean vector ``v`` of ``+-1``,
        ``(norm(v) - norm(-v)) / 2 = gain * v / scale(v)`` (any bias cancels).
        """
        if getattr(self.cfg, "normalization_type", None) is None:
            return torch.ones(self.d_model, device=self.device)
        v = torch.ones(1, self.d_model, device=self.device)
        v[0, 1::2] = -1.0
        v = v - v.mean()
        half_diff = (self.final_norm(v) - self.final_norm(-v)) / 2
        return (half_diff * self.final_norm_scale(v) / v)[0]

    # ------------------------------------------------------------------ tokens
    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, or None."""
        return getattr(self.model, "tokenizer", None)

    def _require_tokenizer(self, what: str) -> Any:
        tok = self.tokenizer
        if tok is None:
            raise ValueError(
                f"{what} needs a tokenizer, but this model has none (model.tokenizer is None). "
                "Pass token ids as a [batch, pos] LongTensor instead."
            )
        return tok

    @property
    def bos_token_id(self) -> Optional[int]:
        """The BOS id from the tokenizer (or the config), or None."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        if bos is None:
            bos = getattr(self.cfg, "bos_token_id", None)
        return None if bos is None else int(bos)

    def to_tokens(
        self, input: Union[str, Sequence[str], torch.Tensor], *, prepend_bos: Optional[bool] = None
    ) -> Tokens:
        """Tokenize ``input`` (a string, a list of strings or a ``[batch, pos]`` id tensor).

        BOS handling: strings get ``bos_token_id`` prepended unless ``prepend_bos`` is False
        (``None``, the default, means True for text); the tokenizer's own special tokens are never
        added. A token tensor is taken as it is: ``prepend_bos=True`` with one warns that no BOS
        is added. Several strings are right-padded; ``Tokens.mask`` marks the real positions
        (right padding never changes a causal model's outputs at real positions).
        """
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise ValueError(f"prepend_bos must be True, False or None, got {prepend_bos!r}.")
        if isinstance(input, torch.Tensor):
            if prepend_bos:
                warnings.warn(
                    "prepend_bos=True has no effect on a token tensor: its ids are used as given, "
                    "and no BOS is added. Prepend the BOS id to the tensor yourself, or pass text.",
                    UserWarning,
                    stacklevel=3,
                )
            ids = input
            if ids.ndim == 1:
                ids = ids.unsqueeze(0)
            if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(
                    f"token input must be an integer tensor of shape [batch, pos], got dtype "
                    f"{ids.dtype} and shape {tuple(input.shape)}."
                )
            if ids.numel() == 0:
                raise ValueError(f"token input is empty (shape {tuple(input.shape)}); pass at least one token.")
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.d_vocab:
                raise ValueError(
                    f"token ids must lie in [0, {self.d_vocab}), got values in [{lo}, {hi}]."
                )
            ids = ids.long()
            tokens = Tokens(ids=ids, mask=torch.ones_like(ids, dtype=torch.bool), prepend_bos=False)
        else:
            if not isinstance(input, (str, list, tuple)):
                raise ValueError(
                    f"input must be a string, a list or tuple of strings, or a [batch, pos] token "
                    f"tensor; got {type(input).__name__} {input!r:.80}. "
                    + (
                        "A mapping or a set has no fixed order of prompts: pass list(...) of the texts."
                        if isinstance(input, (Mapping, Set))
                        else "Wrap a single prompt in a string, or token ids in torch.tensor([[...]])."
                    )
                )
            texts = [input] if isinstance(input, str) else list(input)
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(
                    f"input must be a non-empty string, a non-empty list of strings or a token "
                    f"tensor; got {type(input).__name__} {input!r:.80}."
                )
            prepend_bos = True if prepend_bos is None else prepend_bos
            empty = [i for i, t in enumerate(texts) if not t.strip()]
            if empty:
                raise ValueError(
                    f"prompt(s) at index {empty} are empty or whitespace only: there is nothing "
                    "to read. Pass text."
                )
            tok = self._require_tokenizer("a string input")
            bos = self.bos_token_id
            if prepend_bos and bos is None:
                raise ValueError(
                    "prepend_bos=True but the tokenizer defines no BOS token; pass prepend_bos=False."
                )
            rows = []
            for text in texts:
                ids = list(tok(text, add_special_tokens=False)["input_ids"])
                rows.append(([bos] if prepend_bos else []) + ids)
            length = max(len(r) for r in rows)
            pad = getattr(tok, "pad_token_id", None)
            pad = int(pad) if pad is not None else (bos if bos is not None else 0)
            ids = torch.full((len(rows), length), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), length), dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = True
            tokens = Tokens(ids=ids, mask=mask, prepend_bos=prepend_bos)
        if tokens.ids.shape[1] > self.n_ctx:
            raise ValueError(
                f"the input is {tokens.ids.shape[1]} tokens long (BOS included: "
                f"{tokens.prepend_bos}), longer than the model's context n_ctx={self.n_ctx}. "
                "Shorten the prompt or split it."
            )
        return tokens

    def to_single_token(self, token: Union[str, int]) -> int:
        """The id of ``token`` (a string that must encode to exactly one token, or an id)."""
        if isinstance(token, bool) or not isinstance(token, (str, int)):
            raise ValueError(f"a target must be a token string or an int id, got {token!r}.")
        if isinstance(token, int):
            if not 0 <= token < self.d_vocab:
                raise ValueError(f"target id {token} is outside the vocabulary [0, {self.d_vocab}).")
            return token
        tok = self._require_tokenizer("a string target")
        ids = list(tok(token, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = [self.decode_token(i) for i in ids]
            raise ValueError(
                f"target {token!r} encodes to {len(ids)} tokens {pieces}, not one. Pass a single "
                "token (mind the leading space, e.g. ' Paris') or its id."
            )
        if token[:1].isalnum():
            spaced = list(tok(" " + token, add_special_tokens=False)["input_ids"])
            if len(spaced) == 1:
                warnings.warn(
                    f"target {token!r} (id {ids[0]}) is the word without a leading space; after "
                    f"another word a model predicts {' ' + token!r} (id {spaced[0]}) instead. Pass "
                    f"{' ' + token!r} if that is what you mean, or the id {ids[0]} to keep this token "
                    "without this warning.",
                    UserWarning,
                    stacklevel=4,
                )
        return int(ids[0])

    def embeds_tokens(self, embedding: torch.Tensor, ids: torch.Tensor) -> bool:
        """Whether ``embedding`` (``[batch, pos, d_model]``) is the token embedding of ``ids``.

        Compared by direction (cosine above 0.999 at every position), so an embedding scaled by
        the model (Gemma's ``sqrt(d_model)``, say) still matches; all-zero rows match all-zero
        rows. Used to tell which input a forward pass or a cache belongs to.
        """
        if embedding.ndim != 3 or tuple(embedding.shape[:2]) != tuple(ids.shape):
            return False
        W_E = self.W_E.detach()
        ref = W_E[ids.to(W_E.device)].to(torch.float32)
        emb = embedding.detach().to(ref.device, torch.float32)
        n_ref, n_emb = ref.norm(dim=-1), emb.norm(dim=-1)
        cos = (ref * emb).sum(-1) / (n_ref * n_emb).clamp_min(1e-30)
        both_zero = (n_ref <= 1e-12) & (n_emb <= 1e-12)
        return bool(((cos > 0.999) | both_zero).all())

    def check_cache_tokens(self, cache: Any, ids: torch.Tensor) -> None:
        """Refuse an ``ActivationCache`` made from other tokens than ``ids`` (``[batch, pos]``).

        The cache's ``hook_embed`` (or ``blocks.0.hook_resid_pre`` less ``W_pos``) must be the
        token embedding of ``ids`` at every position (:meth:`embeds_tokens`). A cache of another
        shape is left to the caller's shape checks.

        Raises:
            ValueError: If the cache belongs to other tokens, or holds neither activation.
        """
        first = self.site_name(0, "resid_pre")
        for name, has_pos in (("hook_embed", False), (first, True)):
            try:
                act = cache[name]
            except (KeyError, ValueError, TypeError):
                continue
            if act.ndim != 3 or tuple(act.shape[:2]) != tuple(ids.shape):
                return
            act = act.detach()
            if has_pos and self.W_pos is not None:
                act = act - self.W_pos[: act.shape[1]].detach().to(act.device, act.dtype)
            if not self.embeds_tokens(act, ids):
                raise ValueError(
                    f"the cache does not belong to this input: its {name!r} is not the token embedding "
                    f"of the input's {tuple(ids.shape)} tokens (compared by cosine with W_E at every "
                    "position). Pass the input the cache was made from (mind prepend_bos); if you "
                    "edited the embeddings in that run, pass verify_cache=False."
                )
            return
        raise ValueError(
            "cannot tell which input the cache belongs to: it holds neither 'hook_embed' nor "
            f"{first!r}. Cache them too, or pass verify_cache=False to read it unchecked."
        )

    def decode_token(self, token_id: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return f"<{int(token_id)}>"
        return tok.decode([int(token_id)])

    def decoder(self) -> "TokenDecoder":
        """An id -> string function that caches what it decoded, for result objects."""
        return TokenDecoder(self.tokenizer, self.decode_token)

    # ------------------------------------------------------------------ forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the model's own forward pass on token ids (the user's hooks fire as usual)."""
        return self.model(ids.to(self.device))


# ---------------------------------------------------------------------- model identity
#: Parameters up to this many bytes are hashed in full; larger models hash a strided sample.
FULL_HASH_BYTES = 1 << 30
#: Elements per parameter in the sample of a model above ``FULL_HASH_BYTES``.
_SAMPLE_ELEMENTS = 65536


def model_mode(model: Any) -> str:
    """How ``model`` computes: ``"HookedTransformer"``, ``"TransformerBridge (raw)"`` or
    ``"TransformerBridge (compatibility mode)"``.

    Compatibility mode folds the final norm into ``W_U`` and rewrites the other weights, so the
    same checkpoint read in another mode describes other activations.
    """
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    if access.kind == "hooked":
        return "HookedTransformer"
    return "TransformerBridge (compatibility mode)" if access.compatibility_mode else "TransformerBridge (raw)"


def weights_fingerprint(model: Any) -> str:
    """A short hash of every parameter of ``model``: names, shapes, dtypes and values.

    Each parameter's bytes get a CRC-32 (it detects any accidental change and runs at about
    twice SHA-256's speed), and the names, shapes, dtypes and checksums are hashed together
    with SHA-256. Models with up to ``FULL_HASH_BYTES`` of parameters are read in full
    (SmolLM2-135M, 540 MB in float32: about 0.4 s on two busy CPU cores, against 0.9 s for a
    SHA-256 of the same bytes); larger ones read ``_SAMPLE_ELEMENTS`` evenly spaced elements of
    every parameter, which catches a fine-tune or another checkpoint but not an edit of a
    single weight. Exact bytes, never floating-point sums: the result does not depend on thread
    counts or devices.
    """
    access = model if isinstance(model, ModelAccess) else ModelAccess(model)
    params = list(access.model.named_parameters())
    full = sum(p.numel() * p.element_size() for _, p in params) <= FULL_HASH_BYTES
    h = hashlib.sha256(b"full" if full else b"sample")
    for name, p in params:
        flat = p.detach().reshape(-1)
        if not full and flat.numel() > _SAMPLE_ELEMENTS:
            flat = flat[:: flat.numel() // _SAMPLE_ELEMENTS]
        crc = zlib.crc32(flat.contiguous().cpu().view(torch.uint8).numpy().data)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{crc}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """What a saved lens or checkpoint records about the model it was made with.

    Attributes:
        name: The model's name (``cfg.model_name``).
        n_layers: Number of layers.
        d_model: Residual width.
        d_vocab: Vocabulary size of the unembedding.
        unembedding_fingerprint: :meth:`ModelAccess.unembedding_fingerprint`, a hash of
            ``W_U`` and ``b_U`` (empty when unknown, e.g. a lens imported without checks).
        weights_fingerprint: :func:`weights_fingerprint` of every parameter (empty when not
            computed or unknown).
        dtype: The weights' dtype, e.g. ``"torch.float32"`` (empty when unknown).
        mode: :func:`model_mode` (empty when unknown).
    """

    name: str
    n_layers: int
    d_model: int
    d_vocab: int
    unembedding_fingerprint: str
    weights_fingerprint: str = ""
    dtype: str = ""
    mode: str = ""

    @classmethod
    def of(cls, model: Any, *, weights: bool = True) -> "ModelIdentity":
        """The identity of ``model`` (a TransformerLens model or a :class:`ModelAccess`).

        Args:
            model: The model.
            weights: Hash every parameter too (:func:`weights_fingerprint`); without it
                ``weights_fingerprint`` is empty.
        """
        access = model if isinstance(model, ModelAccess) else ModelAccess(model)
        return cls(
            name=access.name,
            n_layers=access.n_layers,
            d_model=access.d_model,
            d_vocab=access.d_vocab,
            unembedding_fingerprint=access.unembedding_fingerprint(),
            weights_fingerprint=weights_fingerprint(access) if weights else "",
            dtype=str(access.dtype),
            mode=model_mode(access),
        )

    def mismatches(self, other: "ModelIdentity", *, check_unembedding: bool = True) -> list[str]:
        """Human-readable differences that make a lens for ``self`` wrong for ``other``.

        The name alone is not a mismatch (the same weights can be loaded under several names);
        sizes and the unembedding hash are. Other weights, dtype or mode are not either: a
        translator depends only on the residual basis and the readout.
        """
        out = []
        for field in ("n_layers", "d_model", "d_vocab"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                out.append(f"{field}: lens {a}, model {b}")
        if (
            check_unembedding
            and self.unembedding_fingerprint
            and other.unembedding_fingerprint
            and self.unembedding_fingerprint != other.unembedding_fingerprint
        ):
            out.append(
                f"unembedding fingerprint (hash of W_U, b_U): lens {self.unembedding_fingerprint}, "
                f"model {other.unembedding_fingerprint}"
            )
            if self.mode and other.mode and self.mode != other.mode:
                out.append(f"mode: lens fitted on a {self.mode}, model is a {other.mode}")
        return out

    def differences(self, other: "ModelIdentity") -> list[str]:
        """Every difference that makes a checkpoint made with ``self`` wrong to resume with ``other``.

        Mode, dtype, sizes and weights, each as ``"field: checkpoint X, this model Y"``. Between
        two modes the weights differ by construction (compatibility mode rewrites them), so
        they are named as the mode, not as other weights. Fields recorded empty (unknown) are
        not compared.
        """
        out = []

        def differ(field: str) -> bool:
            a, b = getattr(self, field), getattr(other, field)
            return a != b and a != "" and b != ""

        if differ("mode"):
            out.append(f"mode: checkpoint {self.mode}, this model {other.mode}")
        if differ("dtype"):
            out.append(f"dtype: checkpoint {self.dtype}, this model {other.dtype}")
        for field in ("n_layers", "d_model", "d_vocab"):
            if differ(field):
                out.append(f"{field}: checkpoint {getattr(self, field)}, this model {getattr(other, field)}")
        if not out:
            for field, what in (("weights_fingerprint", "weights fingerprint (hash of every parameter)"),
                                ("unembedding_fingerprint", "unembedding fingerprint (hash of W_U, b_U)")):
                if differ(field):
                    out.append(
                        f"{what}: checkpoint {getattr(self, field)} ({self.name!r}), "
                        f"this model {getattr(other, field)} ({other.name!r})"
                    )
                    break
        return out

    def require_same(self, other: "ModelIdentity", what: str) -> None:
        """Raise ``ValueError`` naming every difference between ``self`` (recorded in ``what``,
        e.g. a checkpoint) and ``other`` (the model given now)."""
        problems = self.differences(other)
        if not problems:
            return
        fixes = []
        if self.mode and other.mode and self.mode != other.mode:
            if self.mode.endswith("(compatibility mode)"):
                fixes.append("call model.enable_compatibility_mode() on the bridge it was written with")
            elif self.mode.endswith("(raw)"):
                fixes.append("boot the bridge again without enable_compatibility_mode()")
            else:
                fixes.append(f"load the model as a {self.mode}")
        if self.dtype and other.dtype and self.dtype != other.dtype:
            fixes.append(f"load the model in {self.dtype} (model.to({self.dtype}))")
        fix = " and ".join(fixes) if fixes else "pass the model it was written with"
        raise ValueError(
            f"{what} was written with another model than the one given: " + "; ".join(problems)
            + f". Resuming would mix statistics of two models. To resume, {fix} (the model it was "
            "written with: same weights, dtype and mode); or pass another checkpoint_dir (or delete "
            "this one) to start over."
        )


__all__ += ["ModelIdentity", "model_mode", "weights_fingerprint"]
