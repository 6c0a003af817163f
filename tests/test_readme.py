"""The README's notebook example runs as written on the default model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration


def test_readme_python_example_runs(smol, monkeypatch, tmp_path):
    import tl_latentspaces as tll

    monkeypatch.chdir(tmp_path)  # the example saves a page into the working folder
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    monkeypatch.setattr(tll, "load_default_model", lambda *a, **k: smol)  # reuse the loaded model
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    lens = namespace["lens"]
    assert list(lens.top_ids.shape) == [31, 1, 10, 5]
    assert namespace["diff"].changed_entries()  # the ablation changes something downstream
    assert (tmp_path / "eiffel.html").stat().st_size > 10_000
    # The user-lens example: final_post reads as the model does, the rotated entries otherwise.
    rotation, logit = namespace["mine"]["rotation"], namespace["mine"]["logit"]
    assert float(rotation.kl_to_final[-1].abs().max()) < 1e-5
    assert not torch.equal(rotation.top_ids[1:-1], logit.top_ids[1:-1])
