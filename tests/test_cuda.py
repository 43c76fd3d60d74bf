"""The bf16 CUDA path of every LM script (marker `cuda`, skipped without a GPU): two updates of each on the tiny
synthetic models, under `torchrun --nproc_per_node 1` (nccl), with bf16 autocast, the static KV cache compiled by
transformers (rebel, ppo, rloo, iterative_dpo) and FSDP2's mixed precision (rebel_fsdp). The same commands as
`python -m eval.gpu_check`, at its --dry sizes."""

import os
import time

import pytest
import torch

from eval.gpu_check import DRY, SCRIPTS, benchmark_args, check_script
from eval.synthetic import build

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    return build(DRY.shape, out, DRY.query_length, DRY.response_length, rows=2 * DRY.batch_size)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_on_cuda_in_bf16(name, tiny, tmp_path):
    result = check_script(
        SCRIPTS[name], str(tmp_path / name), benchmark_args(tiny, DRY, updates=2), time.time() + 300, ENV
    )
    assert result["ok"], f"{result.get('error')}:\n" + open(result["log"]).read()[-4000:]
    assert result["loss_finite"] and result["updates"] == 2
    # On CUDA, peak_gb is torch.cuda.max_memory_allocated: a tiny model needs far less than a process's RSS.
    assert 0 < result["peak_gb"] < 0.25
