"""Shared fixtures: tiny random models of every supported flavour, and the real default model.

Unit tests build tiny models from a config (no downloads). Their final-norm weights and the
unembedding bias are randomized, because the identity weights of a fresh model hide bugs in the
norm. Integration tests use the real default model (marked ``integration``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from tl_latentspaces.model import transformer_lens_version

TL_MAJOR = transformer_lens_version()[0]

GPT_LIKE = dict(n_layers=3, d_model=64, n_ctx=32, d_head=16, n_heads=4, d_vocab=100, act_fn="gelu",
                normalization_type="LN", d_mlp=128)
LLAMA_LIKE = dict(d_model=64, d_head=16, n_layers=3, n_ctx=64, d_vocab=100, n_heads=4, n_key_value_heads=2,
                  act_fn="silu", gated_mlp=True, d_mlp=128, normalization_type="RMS",
                  positional_embedding_type="rotary", rotary_dim=16, final_rms=True)


def _randomize_readout(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.ln_final.named_parameters():
            if name.endswith("w") or name.endswith("weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        b_U = getattr(getattr(model, "unembed", None), "b_U", None)
        if isinstance(b_U, torch.nn.Parameter):
            b_U.copy_(torch.randn(b_U.shape, generator=g))


def build_hooked(cfg: dict, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(seed)
    model = HookedTransformer(HookedTransformerConfig(**cfg, seed=seed))
    _randomize_readout(model, seed + 1)
    return model.eval()


def build_bridge(cfg: dict, seed: int = 0, compat: bool = False):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge
    import transformer_lens.model_bridge.sources  # noqa: F401

    torch.manual_seed(seed)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg, seed=seed))
    _randomize_readout(model, seed + 1)
    model.eval()
    if compat:
        model.enable_compatibility_mode()
        model.eval()
    return model


def build_llama_like(seed: int = 0):
    """A tiny Llama-like model of the newest kind this TransformerLens line has (bridge, else hooked)."""
    try:
        return build_bridge(LLAMA_LIKE, seed=seed)
    except ImportError:
        return build_hooked(LLAMA_LIKE, seed=seed)


def _flavours():
    out = []
    try:
        from transformer_lens import HookedTransformer  # noqa: F401

        out += [("hooked-gpt", lambda: build_hooked(GPT_LIKE)), ("hooked-llama", lambda: build_hooked(LLAMA_LIKE))]
    except ImportError:
        pass
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401

        out += [
            ("bridge-gpt", lambda: build_bridge(GPT_LIKE)),
            ("bridge-llama", lambda: build_bridge(LLAMA_LIKE)),
            ("bridge-gpt-compat", lambda: build_bridge(GPT_LIKE, compat=True)),
            ("bridge-llama-compat", lambda: build_bridge(LLAMA_LIKE, compat=True)),
        ]
    except ImportError:
        pass
    return out


FLAVOURS = _flavours()


@pytest.fixture(params=[f[1] for f in FLAVOURS], ids=[f[0] for f in FLAVOURS])
def tiny(request):
    """A tiny random model of each flavour this TransformerLens line supports."""
    return request.param()


@contextmanager
def single_thread() -> Iterator[None]:
    """torch on one CPU thread inside the block, the caller's setting restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread(request):
    """Run a test on one torch thread (:func:`single_thread`), unless it is marked slow.

    Small fits gain little from several threads, and on a shared 2-core machine torch's OpenMP
    barriers make small kernels up to 100x slower while another process holds a core. Slow
    real-model tests keep torch's setting. (The library itself never changes the thread count.)
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    with single_thread():
        yield


@pytest.fixture
def tokens():
    return torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="session")
def smol():
    """The real default model (SmolLM2-135M-Instruct): a TransformerBridge, or a HookedTransformer on 2.x."""
    import tl_latentspaces as tll

    return tll.load_default_model(progress=False)


EIFFEL = "The Eiffel Tower is in the city of"
