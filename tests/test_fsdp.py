"""LoRAct under sharded data parallelism: 2 CPU processes (gloo), FSDP2 and FSDP1 (see fsdp_fit.py).

At a rank above every activation's rank (KnownRankNet) compression is lossless, so each sharded
fit with LoRAct must end with the parameters of the same fit unsharded and without LoRAct.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fsdp_fit import RUNS, unsharded_parameters

SCRIPT = Path(__file__).with_name("fsdp_fit.py")


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> tuple[dict, dict]:
    """Every run of fsdp_fit.RUNS, in one 2-process launch: (rank 0's results, rank 1's).

    Both ranks start at once, as torchrun starts them (LOCAL_RANK set: Lightning launches
    nothing), so their imports overlap instead of rank 1's starting after rank 0's.
    """
    out_dir = tmp_path_factory.mktemp("fsdp")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parent), os.environ.get("PYTHONPATH")])),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "NODE_RANK": "0",
    }
    ranks = [
        subprocess.Popen([sys.executable, str(SCRIPT), str(out_dir)], env={**env, "LOCAL_RANK": str(rank)})
        for rank in (0, 1)
    ]
    try:
        codes = [process.wait(timeout=300) for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert codes == [0, 0]
    return tuple(torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1))


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return unsharded_parameters()


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_sharded_fit_ends_with_the_unsharded_parameters(sharded_runs, expected, run):
    sharding, wrap, options = RUNS[run]
    for result in sharded_runs:
        assert "error" not in result[run], result[run].get("error")
        assert not result[run]["hooks_left"]
        if options is not None:
            assert result[run]["compressed"] > 0
        if options is not None and "checkpoint" in options and wrap:
            # The blocks already run under a CheckpointWrapper: LoRAct compresses their inputs
            # and does not checkpoint them a second time.
            assert any("already run under" in message for message in result[run]["warnings"]), result[run]
    # Sharding reorders the gradient sums, so a plain sharded fit is within 1e-5 of the unsharded
    # one; a fit with LoRAct is held to its plain sharded twin (same sums), within float rounding.
    if options is None:
        reference, atol = expected, 1e-5
    else:
        reference, atol = sharded_runs[0][f"{sharding}_plain"]["parameters"], 1e-6
    parameters = sharded_runs[0][run]["parameters"]
    assert parameters.keys() == expected.keys(), sharded_runs[0][run]["modules"]
    for name, value in reference.items():
        torch.testing.assert_close(parameters[name], value, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
