"""Model access: the one module that knows `HookedTransformer` from `TransformerBridge`.

Everything else reads a model through :class:`ModelAccess`: hook names and stack labels, the weights,
the final norm as the model applies it (float32, firing no hook), and tokenization with explicit BOS.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import hashlib
import importlib
import zlib
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float

from tl_latentspaces.checks import warn_user
from tl_latentspaces.tokenization import Tokens, TokenDecoder, padded_batch, prompt_texts, token_tensor

__all__ = [
    "ModelAccess", "Tokens", "transformer_lens_version", "SITES", "pre_layer", "ModelIdentity", "model_mode",
    "weights_fingerprint",
]

#: Residual-stream sites a lens can read, as TransformerLens names them.
SITES = ("resid_pre", "resid_mid", "resid_post")


def pre_layer(label: Any, n_layers: int) -> Optional[int]:
    """``l`` for a stack label ``"{l}_pre"`` of an ``n_layers`` model, else None."""
    if isinstance(label, str) and label.endswith("_pre") and label[:-4].isdigit() and int(label[:-4]) < n_layers:
        return int(label[:-4])
    return None


def transformer_lens_version() -> tuple[int, ...]:
    """The installed TransformerLens version as a tuple of ints (there is no ``__version__``)."""
    raw = version("transformer-lens")
    digits = ["".join(ch for ch in piece if ch.isdigit()) for piece in raw.split(".")[:3]]
    return tuple(int(d) if d else 0 for d in digits)


def _transformer_lens_class(module: str, name: str) -> Optional[type]:
    # imported on first use: TransformerLens is slow to import; 4.x has no HookedTransformer, 2.x no bridge
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def available_kinds() -> list[str]:
    """The model classes the installed TransformerLens serves, the preferred first: ``"bridge"``
    (``TransformerBridge``, 3.x/4.x, with ``boot_transformers`` attached) and ``"hooked"`` (2.x/3.x)."""
    kinds = []
    if _transformer_lens_class("transformer_lens.model_bridge", "TransformerBridge") is not None:
        with contextlib.suppress(ImportError):
            importlib.import_module("transformer_lens.model_bridge.sources")  # attaches boot_transformers
            kinds.append("bridge")
    if _transformer_lens_class("transformer_lens", "HookedTransformer") is not None:
        kinds.append("hooked")
    return kinds


def model_kind(model: Any) -> str:
    """``"bridge"`` for a ``TransformerBridge``, ``"hooked"`` for a ``HookedTransformer``, else TypeError."""
    hooked = _transformer_lens_class("transformer_lens", "HookedTransformer")
    bridge = _transformer_lens_class("transformer_lens.model_bridge", "TransformerBridge")
    if bridge is not None and isinstance(model, bridge):
        return "bridge"
    if hooked is not None and isinstance(model, hooked):
        return "hooked"
    known = [c.__name__ for c in (hooked, bridge) if c is not None]
    raise TypeError(f"expected a TransformerLens model ({' or '.join(known)}), got {type(model).__module__}."
                    f"{type(model).__name__}. Load one with tl_latentspaces.load_default_model(), "
                    "TransformerBridge.boot_transformers(...) or HookedTransformer.from_pretrained(...).")


def final_norm_function(access: "ModelAccess") -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's final norm as a float32 function that fires no hook (identity without a norm): a
    float32 copy of a bridge's wrapped original module, or a ``HookedTransformer``'s norm recomputed
    from its parameters (its module would fire ``hook_scale`` and ``hook_normalized``)."""
    norm_type = getattr(access.cfg, "normalization_type", None)
    ln_final = getattr(access.model, "ln_final", None)
    has_norm = norm_type is not None and ln_final is not None
    if access.kind == "bridge":
        original = getattr(ln_final, "_original_component", None) or getattr(ln_final, "original_component", None)
        if original is not None:
            module = copy.deepcopy(original).to(torch.float32)
            module.requires_grad_(False)
            return module
        if has_norm:
            raise ValueError(f"cannot apply the final norm of {access.name}: ln_final is "
                             f"{type(ln_final).__name__} without an original component.")
    if not has_norm:
        return lambda x: x
    if norm_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise ValueError(f"cannot apply normalization_type={norm_type!r} of {access.name}; supported: "
                         "LN, LNPre, RMS, RMSPre or None.")
    eps = float(getattr(access.cfg, "eps", 1e-5))
    centred = norm_type in ("LN", "LNPre")
    w = getattr(ln_final, "w", None)
    b = getattr(ln_final, "b", None) if centred else None
    w = None if w is None else w.detach().to(torch.float32)
    b = None if b is None else b.detach().to(torch.float32)

    def norm(x: torch.Tensor) -> torch.Tensor:
        if centred:
            x = x - x.mean(-1, keepdim=True)
        x = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        if w is not None:
            x = x * w.to(x.device)
        if b is not None:
            x = x + b.to(x.device)
        return x

    return norm


class ModelAccess:
    """A read-only view of a ``HookedTransformer`` (TransformerLens 2.x/3.x) or a ``TransformerBridge``
    (3.x/4.x, raw or in compatibility mode) that hides the version differences; ``TypeError`` for
    anything else."""

    def __init__(self, model: Any):
        self.kind = model_kind(model)
        self.model = model
        self.cfg = model.cfg
        self.n_layers = int(self.cfg.n_layers)
        self.d_model = int(self.cfg.d_model)
        self.n_ctx = int(self.cfg.n_ctx)

    @classmethod
    def of(cls, model: Any) -> "ModelAccess":
        """``model`` itself when it is already a :class:`ModelAccess`, else a new view of it."""
        return model if isinstance(model, ModelAccess) else cls(model)

    @property
    def d_vocab(self) -> int:
        """Vocabulary size, as the unembedding has it (columns of ``W_U``)."""
        return int(self.W_U.shape[1])

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
            raise ValueError(f"{operation} needs the model in eval mode, but it is in training mode (dropout would "
                             "change every readout). Call model.eval() first.")

    @property
    def W_E(self) -> Float[torch.Tensor, "d_vocab d_model"]:
        return self.model.W_E

    @property
    def W_U(self) -> Float[torch.Tensor, "d_model d_vocab"]:
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
        for owner in (getattr(self.model, "pos_embed", None), self.model):
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

    @cached_property
    def hook_dict(self) -> dict[str, Any]:
        """Hook name -> ``HookPoint``, bridge aliases included."""
        return dict(self.model.hook_dict)

    def site_name(self, layer: int, site: str) -> str:
        """The hook name of ``site`` (one of :data:`SITES`) at ``layer``: ``blocks.{layer}.hook_{site}``."""
        if site not in SITES:
            raise ValueError(f"unknown residual site {site!r}; valid sites are {list(SITES)}.")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer!r} is out of range: this model has layers 0..{self.n_layers - 1}.")
        return f"blocks.{layer}.hook_{site}"

    def stack_sites(self, incl_mid: bool = False) -> list[tuple[str, str]]:
        """The residual stack as ``(label, hook_name)`` pairs, with ``accumulated_resid``'s labels:
        ``"{l}_pre"`` (and ``"{l}_mid"``) per layer, then ``"final_post"`` (the last ``resid_post``)."""
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
            raise ValueError(f"this model has no hook point named {name!r}.{hint} "
                             f"Valid names are listed by model.hook_dict ({len(self.hook_dict)} entries).")
        return hp

    @cached_property
    def _final_norm_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return final_norm_function(self)

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
        """The final norm's per-feature gain (ones without a norm or when folded), read off the norm itself:
        for a zero-mean vector ``v`` of ``+-1``, ``(norm(v) - norm(-v)) / 2 = gain * v / scale(v)``."""
        if getattr(self.cfg, "normalization_type", None) is None:
            return torch.ones(self.d_model, device=self.device)
        v = torch.ones(1, self.d_model, device=self.device)
        v[0, 1::2] = -1.0
        v = v - v.mean()
        half_diff = (self.final_norm(v) - self.final_norm(-v)) / 2
        return (half_diff * self.final_norm_scale(v) / v)[0]

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def require_tokenizer(self, what: str) -> Any:
        """The tokenizer; ``ValueError`` naming ``what`` needs it when the model has none."""
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"{what} needs a tokenizer, but this model has none (model.tokenizer is None). "
                             "Pass token ids as a [batch, pos] LongTensor instead.")
        return tok

    @property
    def bos_token_id(self) -> Optional[int]:
        """The BOS id from the tokenizer (or the config), or None."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(self.cfg, "bos_token_id", None)
        return None if bos is None else int(bos)

    def to_tokens(
        self, input: Union[str, Sequence[str], torch.Tensor], *, prepend_bos: Optional[bool] = None
    ) -> Tokens:
        """Tokenize ``input``: a string or a list of strings (right-padded), with ``bos_token_id`` prepended
        unless ``prepend_bos`` is False (None means True) and never the tokenizer's own special tokens; or
        a ``[batch, pos]`` id tensor, taken as it is."""
        if prepend_bos is not None and not isinstance(prepend_bos, bool):
            raise ValueError(f"prepend_bos must be True, False or None, got {prepend_bos!r}.")
        if isinstance(input, torch.Tensor):
            if prepend_bos:
                warn_user("prepend_bos=True has no effect on a token tensor: its ids are used as given, and no "
                          "BOS is added. Prepend the BOS id to the tensor yourself, or pass text.")
            tokens = token_tensor(input, self.d_vocab)
        else:
            texts = prompt_texts(input)
            prepend_bos = True if prepend_bos is None else prepend_bos
            tok = self.require_tokenizer("a string input")
            bos = self.bos_token_id
            if prepend_bos and bos is None:
                raise ValueError("prepend_bos=True but the tokenizer defines no BOS token; pass prepend_bos=False.")
            tokens = padded_batch(tok, texts, bos, prepend_bos)
        if tokens.ids.shape[1] > self.n_ctx:
            raise ValueError(f"the input is {tokens.ids.shape[1]} tokens long (BOS included: {tokens.prepend_bos}), "
                             f"longer than the model's context n_ctx={self.n_ctx}. Shorten the prompt or split it.")
        return tokens

    def to_single_token(self, token: Union[str, int]) -> int:
        """The id of ``token`` (a string that must encode to exactly one token, or an id); a word without its
        leading space warns."""
        if isinstance(token, bool) or not isinstance(token, (str, int)):
            raise ValueError(f"a target must be a token string or an int id, got {token!r}.")
        if isinstance(token, int):
            if not 0 <= token < self.d_vocab:
                raise ValueError(f"target id {token} is outside the vocabulary [0, {self.d_vocab}).")
            return token
        tok = self.require_tokenizer("a string target")
        ids = list(tok(token, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            pieces = [tok.decode([int(i)]) for i in ids]
            raise ValueError(f"target {token!r} encodes to {len(ids)} tokens {pieces}, not one. Pass a "
                             "single token (mind the leading space, e.g. ' Paris') or its id.")
        if token[:1].isalnum():
            spaced = list(tok(" " + token, add_special_tokens=False)["input_ids"])
            if len(spaced) == 1:
                spaced_token = " " + token
                warn_user(f"target {token!r} (id {ids[0]}) is the word without a leading space; after another"
                          f" word a model predicts {spaced_token!r} (id {spaced[0]}) instead. Pass "
                          f"{spaced_token!r} if that is what you mean, or the id {ids[0]} to keep this token "
                          "without this warning.")
        return int(ids[0])

    def embeds_tokens(self, embedding: torch.Tensor, ids: torch.Tensor) -> bool:
        """Whether ``embedding`` (``[batch, pos, d_model]``) is ``W_E``'s embedding of ``ids``
        (``[batch, pos]``), by direction (cosine > 0.999 everywhere: Gemma's scaled embedding matches)."""
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
        """Refuse an ``ActivationCache`` made from other tokens than ``ids`` (:func:`check_cache_tokens`)."""
        check_cache_tokens(self, cache, ids)

    def decoder(self) -> TokenDecoder:
        """An id -> string function that caches what it decoded (``"<id>"`` without a tokenizer)."""
        tok = self.tokenizer
        return TokenDecoder(tok, lambda i: f"<{int(i)}>" if tok is None else tok.decode([int(i)]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the model's own forward pass on token ids (the user's hooks fire as usual)."""
        return self.model(ids.to(self.device))


def check_cache_tokens(access: ModelAccess, cache: Any, ids: torch.Tensor) -> None:
    """``ValueError`` unless the cache's ``hook_embed`` (or ``blocks.0.hook_resid_pre`` less ``W_pos``) is
    the token embedding of ``ids`` (``[batch, pos]``); a cache of another shape is left to the caller."""
    first = access.site_name(0, "resid_pre")
    for name, has_pos in (("hook_embed", False), (first, True)):
        try:
            act = cache[name]
        except (KeyError, ValueError, TypeError):
            continue
        if act.ndim != 3 or tuple(act.shape[:2]) != tuple(ids.shape):
            return
        act = act.detach()
        if has_pos and access.W_pos is not None:
            act = act - access.W_pos[: act.shape[1]].detach().to(act.device, act.dtype)
        if not access.embeds_tokens(act, ids):
            raise ValueError(f"the cache does not belong to this input: its {name!r} is not the token "
                             f"embedding of the input's {tuple(ids.shape)} tokens (compared by cosine "
                             "with W_E at every position). Pass the input the cache was made from (mind "
                             "prepend_bos); if you edited the embeddings in that run, pass "
                             "verify_cache=False.")
        return
    raise ValueError(f"cannot tell which input the cache belongs to: it holds neither 'hook_embed' nor "
                     f"{first!r}. Cache them too, or pass verify_cache=False to read it unchecked.")


#: Parameters up to this many bytes are hashed in full; larger models hash this many elements of each.
FULL_HASH_BYTES = 1 << 30
_SAMPLE_ELEMENTS = 65536


def model_mode(model: Any) -> str:
    """``"HookedTransformer"``, ``"TransformerBridge (raw)"`` or ``"TransformerBridge (compatibility mode)"``
    (which rewrites the weights: one checkpoint read in two modes describes other activations)."""
    access = ModelAccess.of(model)
    if access.kind == "hooked":
        return "HookedTransformer"
    return "TransformerBridge (compatibility mode)" if access.compatibility_mode else "TransformerBridge (raw)"


def weights_fingerprint(model: Any) -> str:
    """A short hash of every parameter's name, shape, dtype and exact bytes (a CRC-32 each, then SHA-256);
    above ``FULL_HASH_BYTES``, of ``_SAMPLE_ELEMENTS`` evenly spaced elements per parameter (that catches
    another checkpoint or a fine-tune, not an edit of a single weight)."""
    params = list(ModelAccess.of(model).model.named_parameters())
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
    """What a saved lens or checkpoint records about the model it was made with: the fingerprints are
    :meth:`ModelAccess.unembedding_fingerprint` and :func:`weights_fingerprint`, ``mode`` is
    :func:`model_mode`; an empty string means unknown."""

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
        """The identity of ``model`` (or a :class:`ModelAccess`); ``weights=False`` skips hashing
        every parameter (``weights_fingerprint`` is then empty)."""
        access = ModelAccess.of(model)
        return cls(
            name=access.name, n_layers=access.n_layers, d_model=access.d_model, d_vocab=access.d_vocab,
            unembedding_fingerprint=access.unembedding_fingerprint(),
            weights_fingerprint=weights_fingerprint(access) if weights else "", dtype=str(access.dtype),
            mode=model_mode(access),
        )

    def mismatches(self, other: "ModelIdentity", *, check_unembedding: bool = True) -> list[str]:
        """Differences that make a lens for ``self`` wrong for ``other``: sizes and the unembedding hash (a
        translator depends only on the residual basis and the readout, not on the name, dtype or mode)."""
        sizes = ("n_layers", "d_model", "d_vocab")
        out = [f"{field}: lens {getattr(self, field)}, model {getattr(other, field)}"
               for field in sizes if getattr(self, field) != getattr(other, field)]
        mine, theirs = self.unembedding_fingerprint, other.unembedding_fingerprint
        if check_unembedding and mine and theirs and mine != theirs:
            out.append(f"unembedding fingerprint (hash of W_U, b_U): lens {mine}, model {theirs}")
            if self.mode and other.mode and self.mode != other.mode:
                out.append(f"mode: lens fitted on a {self.mode}, model is a {other.mode}")
        return out

    def differences(self, other: "ModelIdentity") -> list[str]:
        """Every difference that makes a checkpoint made with ``self`` wrong to resume with ``other``, as
        ``"field: checkpoint X, this model Y"``; weights are compared only when mode, dtype and sizes agree."""

        def differ(field: str) -> bool:
            a, b = getattr(self, field), getattr(other, field)
            return a != b and a != "" and b != ""

        out = [f"{field}: checkpoint {getattr(self, field)}, this model {getattr(other, field)}"
               for field in ("mode", "dtype", "n_layers", "d_model", "d_vocab") if differ(field)]
        if not out:
            for field, what in (("weights_fingerprint", "weights fingerprint (hash of every parameter)"),
                                ("unembedding_fingerprint", "unembedding fingerprint (hash of W_U, b_U)")):
                if differ(field):
                    out.append(f"{what}: checkpoint {getattr(self, field)} ({self.name!r}), "
                               f"this model {getattr(other, field)} ({other.name!r})")
                    break
        return out

    def require_same(self, other: "ModelIdentity", what: str) -> None:
        """Raise ``ValueError`` naming every difference between ``self`` (recorded in ``what``, e.g. a
        checkpoint) and ``other`` (the model given now), with how to fix it."""
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
        raise ValueError(f"{what} was written with another model than the one given: " + "; ".join(problems)
                         + f". Resuming would mix statistics of two models. To resume, {fix} (the model it was "
                         "written with: same weights, dtype and mode); or pass another checkpoint_dir (or delete "
                         "this one) to start over.")
