"""One run on two processes (torchrun, gloo on CPU) equals one process with the same global batch: the adapter,
the held-out rows, the logged metrics, and after a kill -9 plus --resume under torchrun too. Also the runtime's
shards and the one-line error for a world size that doesn't divide the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from preftune.commands.cli import main
from preftune.core.config import Config
from preftune.core.errors import InputError
from preftune.core.runtime import Runtime, init
from preftune.training.loop import Schedule


def flags(world, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", "--model", str(world.model_dir), "--data", str(world.train_path), "--eval-data",
            str(world.eval_path), "--objective", "dpo", "--lora-rank", "4", "--lr", "2e-3", "--max-steps", "4",
            "--eval-every", "2", "--save-every", "2", "--warmup-ratio", "0", "--max-train-pairs", "32",
            "--threads", "1", "--quiet", "--batch-size", str(batch_size), "--output", str(out),
            "--cache-dir", str(out.parent / "cache"), *extra]


def torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    # --standalone picks a free port (rendezvous at localhost:0), so parallel test runs don't clash
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "preftune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def one_process(tiny_world, tmp_path_factory) -> Path:
    """The reference: one process, batch 8 = the two-process run's 4 per rank x 2 ranks."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(flags(tiny_world, out, 8)) == 0
    return out


def rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "eval_pairs.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "adapter" / "adapter_model.safetensors")), \
        load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert sorted(wa) == sorted(wb) and len(wa) > 0
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-5, k
    ra = [json.loads(x) for x in (a / "eval_pairs.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (b / "eval_pairs.jsonl").read_text().splitlines()]
    assert len(ra) == 64 and [r["id"] for r in ra] == [r["id"] for r in rb]  # every pair once, in order
    assert len({r["id"] for r in rb}) == 64                                  # none duplicated as padding
    for x, y in zip(ra, rb):
        assert abs(x["margin"] - y["margin"]) < 1e-5 and abs(x["chosen_logps"] - y["chosen_logps"]) < 1e-5
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):  # global values: the two-process run logs the whole global batch's loss
        for key in ("loss", "rewards/margins", "grad_norm", "eval_loss", "eval_accuracy"):
            if key in x:
                assert abs(x[key] - y[key]) < 1e-5, (x["step"], key)
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["status"] == sb["status"] == "finished" and sb["steps"] == 4


def test_torchrun_two_processes_equal_one(tiny_world, one_process, tmp_path):
    out = tmp_path / "ddp"
    res = torchrun(flags(tiny_world, out, 4))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("held-out accuracy") == 1  # rank 0 alone prints
    assert_same_run(one_process, out)
    # rank 0 alone wrote: no stray temp files or second lock, and the reference cache of the sharded layout
    assert not (out / ".lock").exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "audit.json", "config.yaml", "eval_pairs.jsonl",
                                                      "metrics.jsonl", "summary.json"]
    assert any(p.name.endswith("-w2.safetensors") for p in (tmp_path / "cache" / "reference").iterdir())


def test_torchrun_trdpo_equals_one_process(tiny_world, tmp_path):
    """TR-DPO: every rank syncs its reference adapter alike, and each synced period's reference pass splits
    over the ranks as the first one does."""
    sync = ("--ref-sync-steps", "2", "--ref-sync-alpha", "0.5")
    assert main(flags(tiny_world, tmp_path / "one", 8, *sync)) == 0
    res = torchrun(flags(tiny_world, tmp_path / "ddp", 4, *sync))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["ref_sync"]["syncs"] == 1


def test_torchrun_kill_9_then_resume(tiny_world, one_process, tmp_path):
    out = tmp_path / "ddp"
    marker = tmp_path / "killed"
    # rank 0 SIGKILLs itself right after the step-2 checkpoint; torchrun then takes the job down
    res = torchrun(flags(tiny_world, out, 4), PREFTUNE_TEST_KILL_AFTER_CHECKPOINT=str(marker))
    assert res.returncode != 0 and marker.exists()
    assert (out / "checkpoints" / "step-0000002" / "state.json").exists()
    assert not (out / "summary.json").exists()
    res = torchrun(flags(tiny_world, out, 4, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(one_process, out)
    assert not (out / "checkpoints").exists()


def test_torchrun_full_fine_tuning_with_fsdp_equals_one_process(tiny_world, tmp_path):
    """--lora-rank 0 over two ranks with FSDP2 (forced on CPU by PREFTUNE_FSDP=1; on GPUs it is the default)."""
    full = ["--lora-rank", "0", "--lr", "1e-4", "--save-every", "0", "--max-steps", "3"]
    one = tmp_path / "one"
    assert main(flags(tiny_world, one, 8, *full)) == 0
    out = tmp_path / "fsdp"
    res = torchrun(flags(tiny_world, out, 4, *full), PREFTUNE_FSDP="1")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in a:  # the full state dict gathered from the shards: the one-process weights
        assert (a[k] - b[k]).abs().max().item() < 1e-5, k
    assert (out / "model" / "tokenizer.json").exists() and not (out / "adapter").exists()
    ra, rb = rows(one), rows(out)
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    assert max(abs(x["margin"] - y["margin"]) for x, y in zip(ra, rb)) < 1e-5


def test_world_size_that_does_not_divide_the_batch(tiny_world, tmp_path):
    cfg = Config(model="m", data="d", batch_size=4, max_steps=0, epochs=1)
    pairs = [SimpleNamespace(prompt_ids=[1], chosen_ids=[2], rejected_ids=[3])] * 31
    with pytest.raises(InputError) as e:  # 31 pairs in global batches of 4 x 2: the epoch's last step has 7
        Schedule(cfg, pairs, world_size=2).check_world(2)
    msg = str(e.value)
    assert "world size 2 doesn't divide the global batch" in msg and "has 7 pairs" in msg
    assert "world sizes that work with --batch-size 4: 1;" in msg  # 31 is odd: no even split anywhere
    assert "batch sizes that work with 2 processes: none" in msg and e.value.field == "batch_size"
    Schedule(cfg, pairs[:24], world_size=2).check_world(2)  # 24 = 3 x 8: every step splits evenly
    Schedule(cfg, pairs, world_size=1).check_world(1)       # one process: nothing to split

    # the same through torchrun: one line (from rank 0), the ranks' exit code 2, nothing written
    out = tmp_path / "bad"
    res = torchrun(flags(tiny_world, out, 4, "--max-train-pairs", "31"))
    lines = [x for x in res.stderr.splitlines() if x.startswith("preftune: error:")]
    assert len(lines) == 1 and "doesn't divide the global batch" in lines[0], res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr and res.returncode != 0
    assert not out.exists()


def test_runtime_shards_and_single_process_no_ops():
    assert init() == Runtime()  # no launcher variables: world size 1
    rt = Runtime()
    assert rt.is_main and not rt.distributed and rt.shard(5) == (0, 5) and rt.gather(3) == [3]
    assert rt.broadcast("x") == "x"
    shards = [Runtime(rank=r, world_size=3).shard(10) for r in range(3)]
    assert shards == [(0, 4), (4, 7), (7, 10)]  # contiguous, no padding, nothing twice
    assert [Runtime(rank=r, world_size=4).shard(2) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert not Runtime(rank=1, world_size=2).is_main
