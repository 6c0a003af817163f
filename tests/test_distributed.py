"""Multi-process runs with torchrun (gloo on CPU) equal single-process runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tl_latentspaces.distributed import decode_state, encode_state, check_port_free, finish_distributed

WORKER = Path(__file__).parent / "dist" / "stats_worker.py"
FIT_WORKER = Path(__file__).parent / "dist" / "fit_worker.py"
EXIT_WORKER = Path(__file__).parent / "dist" / "exit_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _single_and_torchrun(worker: Path, tmp_path: Path, timeout: int) -> tuple[dict, dict]:
    """Run ``worker`` alone and under torchrun with 2 gloo processes; the two files it wrote."""
    single, multi = tmp_path / "single.safetensors", tmp_path / "multi.safetensors"
    subprocess.run([sys.executable, str(worker), str(single)], check=True, env=_env(), timeout=timeout)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(worker), str(multi)]
    subprocess.run(cmd, check=True, env=_env(), timeout=timeout)
    a, b = load_file(single), load_file(multi)
    assert int(a["world"]) == 1 and int(b["world"]) == 2
    return a, b


def test_state_encoding_round_trips():
    state = {"a": torch.randn(3, 4, dtype=torch.float64), "n": 7, "flag": True, "x": 0.5, "none": None}
    back = decode_state(encode_state(state))
    assert torch.equal(back["a"], state["a"]) and back["n"] == 7 and back["flag"] is True
    assert back["x"] == 0.5 and back["none"] is None


def test_finish_distributed_leaves_the_group(tmp_path):
    """Without a group it does nothing; with one it destroys it, and a second call is harmless."""
    import torch.distributed as dist

    finish_distributed()
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        finish_distributed()
        assert not dist.is_initialized()
        finish_distributed()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["finish", "exit"])
def test_ranks_exit_cleanly(mode):
    """No rank is aborted at exit, whether the script calls finish_distributed() or just ends.

    Without the teardown, about half of these runs fail; five runs all passing leaves a 3% chance
    that a regression goes unseen.
    """
    for _ in range(5):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), str(EXIT_WORKER), mode]
        proc = subprocess.run(cmd, env=_env(), timeout=120, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port_free(port)


def test_cli_port_in_use_is_a_clear_error_and_writes_nothing(tmp_path):
    """Rank 0 of a process group whose MASTER_PORT is taken: exit 2, a message naming the port, no file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = dict(_env(), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = tmp_path / "align.json"
        proc = subprocess.run([sys.executable, "-m", "tl_latentspaces.cli", "align", "--quiet", "--out", str(out)],
                              env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"MASTER_PORT={port}: it is already in use" in proc.stderr and "--master_port" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    a, b = _single_and_torchrun(WORKER, tmp_path, timeout=300)
    for key in a:
        if key != "world":
            torch.testing.assert_close(b[key], a[key], atol=1e-10, rtol=0, msg=key)


@pytest.mark.slow
def test_tuned_lens_fit_two_processes_equal_one(tmp_path):
    """Sharded collection and Gauss-Newton statistics reduced over 2 gloo ranks: the same lens."""
    a, b = _single_and_torchrun(FIT_WORKER, tmp_path, timeout=600)
    assert int(a["n_train"]) == int(b["n_train"]) > 2000
    assert bool(a["refined"].any()), "no layer was refined: the test would not exercise the reduced Gauss-Newton steps"
    assert torch.equal(a["refined"], b["refined"])
    torch.testing.assert_close(b["weight"], a["weight"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["bias"], a["bias"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["val_kl"], a["val_kl"], atol=1e-6, rtol=1e-6)


def test_nested_state_encoding_round_trips():
    state = {"cov": [{"mean": torch.arange(3.0), "n": 4}, {"mean": torch.zeros(2), "n": 0}], "pending": [],
             "empty": {}, "name": "x", "pairs": {"0,1": (torch.ones(1), 2.5)}}
    back = decode_state(encode_state(state))
    assert torch.equal(back["cov"][0]["mean"], torch.arange(3.0)) and back["cov"][1]["n"] == 0
    assert back["pending"] == [] and back["empty"] == {} and back["name"] == "x"
    assert back["pairs"]["0,1"][1] == 2.5 and torch.equal(back["pairs"]["0,1"][0], torch.ones(1))


def _cli_single_and_torchrun(args: list[str], tmp_path: Path) -> tuple[dict, dict, str]:
    """Run the command line alone and under torchrun (2 gloo processes); both JSON outputs, torchrun's stdout."""
    import json

    pytest.importorskip("transformer_lens.model_bridge")
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    subprocess.run([sys.executable, "-m", "tl_latentspaces.cli", *args, "--out", str(single)],
                   check=True, env=_env(), timeout=900)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "tl_latentspaces.cli", *args, "--out", str(multi)]
    proc = subprocess.run(cmd, check=True, env=_env(), timeout=900, capture_output=True, text=True)
    return json.loads(single.read_text()), json.loads(multi.read_text()), proc.stdout


@pytest.mark.integration
@pytest.mark.slow
def test_align_command_two_processes_equal_one(tmp_path):
    """The `align` command under torchrun (2 gloo processes) gives the single-process numbers."""
    a, b, _ = _cli_single_and_torchrun(["align", "--quiet", "--max-tokens", "2048", "--batch-size", "4"], tmp_path)
    assert a["n_tokens"] == b["n_tokens"] > 0
    for group, key in [("cka", "embed"), ("cka", "embed_debiased"), ("variance", "embed"), ("drift", "cos_mean"),
                       ("procrustes", "embed_error"), ("angles", "embed")]:
        torch.testing.assert_close(torch.tensor(b[group][key], dtype=torch.float64),
                                   torch.tensor(a[group][key], dtype=torch.float64), atol=1e-10, rtol=0, msg=f"{group}.{key}")


@pytest.mark.integration
@pytest.mark.slow
def test_eval_command_two_processes_equal_one(tmp_path):
    """`eval` under torchrun joins the process group: shared work, one table, one file, single-process numbers."""
    a, b, stdout = _cli_single_and_torchrun(["eval", "--quiet", "--no-tuned", "--max-tokens", "1024"], tmp_path)
    assert a["n_positions"] == b["n_positions"] > 0
    assert stdout.count("wrote ") == 1, "only rank 0 prints and writes"
    for key in ("kl_to_final", "cross_entropy", "top1_agreement", "prediction_depth", "kl_std"):
        torch.testing.assert_close(torch.tensor(b[key], dtype=torch.float64), torch.tensor(a[key], dtype=torch.float64),
                                   atol=1e-6, rtol=1e-6, msg=key)
