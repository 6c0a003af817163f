"""Writes this folder with the ``tuned-lens`` package itself (run once; the output is committed).

    python3 -m venv /tmp/vtl
    /tmp/vtl/bin/pip install torch==2.13.0 transformers==5.24.0 tuned-lens==0.2.0
    /tmp/vtl/bin/python tests/data/tuned_lens_pkg/make_reference.py

* ``model/``: a tiny random Llama (2 layers, d_model 16, vocabulary 64, untied unembedding,
  a final RMSNorm with non-trivial weights) and a 64-word word-level tokenizer (a
  ``TransformerBridge`` needs one), saved by ``save_pretrained``.
* ``lens/``: ``tuned_lens.TunedLens.save`` of a lens for it, translators set to small random
  values (a zero lens would only test the identity).
* ``reference.safetensors``: ``input_ids`` and, for every layer ``i``, ``lens_logits.{i}`` =
  ``lens(hidden_states[i], idx=i)`` as the package computes it.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tuned_lens import TunedLens

HERE = Path(__file__).parent

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    model.model.norm.weight.copy_(1 + 0.5 * torch.randn(16))
model.save_pretrained(str(HERE / "model"), safe_serialization=True)
words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
core.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(
    tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
).save_pretrained(str(HERE / "model"))

lens = TunedLens.from_model(model)
with torch.no_grad():
    for translator in lens:
        translator.weight.copy_(0.2 * torch.randn_like(translator.weight))
        translator.bias.copy_(0.2 * torch.randn_like(translator.bias))
lens.save(str(HERE / "lens"))

ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1))
ids[:, 0] = 1
with torch.no_grad():
    out = model(ids, output_hidden_states=True)
    tensors = {"input_ids": ids, "model_logits": out.logits.contiguous()}
    for i, h in enumerate(out.hidden_states[:-1]):
        tensors[f"lens_logits.{i}"] = lens(h, idx=i).contiguous()
save_file(tensors, str(HERE / "reference.safetensors"))
print("wrote", sorted(p.name for p in HERE.rglob("*") if p.is_file()))
