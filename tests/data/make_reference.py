"""Write the default model's reference log-probabilities, computed by the TransformerLens 4.x bridge.

``default_model_reference.safetensors`` holds, for a fixed held-out text (BOS prepended):

* ``tokens``: ``[1, pos]`` token ids;
* ``top_ids``, ``top_log_probs``: the 50 most likely next tokens and their log-probabilities at
  every position, ``[pos, 50]``;
* ``next_log_probs``: the log-probability of each actual next token, ``[pos - 1]``.

The tests check that the bridge still reproduces it and that every other way of loading the model
(the ``HookedTransformer`` on TransformerLens 2.x) agrees within 1e-3 nats. Run on TransformerLens 4.x:

    python tests/data/make_reference.py
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the package beside this file

import tl_latentspaces as tll  # noqa: E402

#: Text the model was not shown by any test or fit: a paragraph written for this file.
HELD_OUT = (
    "Our lighthouse keeper wrote in 1893 that the fog came in twice before noon; she noted the café's "
    "bell rang 🔔 three times."
)
OUT = Path(__file__).with_name("default_model_reference.safetensors")
TOP_K = 50


def main() -> None:
    model = tll.load_default_model(kind="bridge", progress=False)
    tokens = model.to_tokens(HELD_OUT, prepend_bos=True)
    with torch.no_grad():
        log_probs = model(tokens).log_softmax(-1)[0].float()
    top = log_probs.topk(TOP_K, dim=-1)
    next_lp = log_probs[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    meta = {
        "text": HELD_OUT,
        "transformer_lens": importlib.metadata.version("transformer-lens"),
        "transformers": importlib.metadata.version("transformers"),
        "torch": torch.__version__,
    }
    save_file(
        {"tokens": tokens.contiguous(), "top_ids": top.indices.contiguous(),
         "top_log_probs": top.values.contiguous(), "next_log_probs": next_lp.contiguous()},
        str(OUT), metadata=meta,
    )
    print(f"wrote {OUT}: {tokens.shape[1]} tokens, {meta}")


if __name__ == "__main__":
    main()
