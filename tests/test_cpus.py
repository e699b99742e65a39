"""The CPUs a run may use and how its threads wait on a busy machine (issue 24, item 9).

    pytest tests/test_cpus.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from preftune.core import cpus


def _fresh(code: str, env: dict[str, str] | None = None, cpu_list: set[int] | None = None) -> dict:
    """Run ``code`` in a new interpreter (torch not yet loaded), optionally pinned to ``cpu_list``."""
    def pin() -> None:
        if cpu_list:
            os.sched_setaffinity(0, cpu_list)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **(env or {})}, preexec_fn=pin)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_threads_follow_the_affinity_mask_not_the_machine():
    got = _fresh("import json; from preftune.core.cpus import allowed_cpus; print(json.dumps(allowed_cpus()))",
                 cpu_list={0})
    assert got == 1


@pytest.mark.parametrize("text, want", [("max 100000", None), ("150000 100000", 1.5), ("50000 100000", 0.5)])
def test_cgroup_v2_quota(text, want, tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text(text + "\n")
    real = cpus.Path
    monkeypatch.setattr(cpus, "Path", lambda p: tmp_path / "cpu.max" if p == "/sys/fs/cgroup/cpu.max" else real(p))
    assert cpus._cgroup_quota() == want
    if want is not None:  # a 1.5-CPU quota may run 2 threads; half a CPU still one
        assert cpus.allowed_cpus() == min(len(os.sched_getaffinity(0)), max(1, -(-want // 1)))


def test_busy_machine_chooses_passive_idle_leaves_the_default(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as the command line sees it: before torch loads
    monkeypatch.setattr(cpus, "allowed_cpus", lambda: 2)
    monkeypatch.setattr(cpus, "busy_cpus", lambda: 1.9)
    env: dict[str, str] = {}
    assert cpus.choose_wait_policy(env) == cpus.WaitPolicy("passive", 1.9, 2)
    assert env == {"OMP_WAIT_POLICY": "passive", "OMP_NUM_THREADS": "2"}
    monkeypatch.setattr(cpus, "busy_cpus", lambda: 0.2)
    env = {}
    assert cpus.choose_wait_policy(env).policy is None and env == {"OMP_NUM_THREADS": "2"}
    env = {"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "1"}  # the user's settings always win
    monkeypatch.setattr(cpus, "busy_cpus", lambda: 2.0)
    assert cpus.choose_wait_policy(env).policy is None and env == {"OMP_WAIT_POLICY": "active", "OMP_NUM_THREADS": "1"}


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  libgomp has read its environment already

    monkeypatch.setattr(cpus, "busy_cpus", lambda: 2.0)
    env: dict[str, str] = {}
    assert cpus.choose_wait_policy(env).policy is None and env == {}


def test_a_fresh_interpreter_sizes_torch_by_the_affinity_mask():
    code = ("import json; from preftune.core.cpus import choose_wait_policy; choose_wait_policy(); import torch; "
            "print(json.dumps(torch.get_num_threads()))")
    assert _fresh(code, cpu_list={0}) == 1


def test_only_commands_that_compute_sample_the_machine():
    from preftune.commands.cli import COMMANDS_BY_NAME

    computing = {name for name, c in COMMANDS_BY_NAME.items() if c.computes}
    assert {"train", "eval", "ablate", "pipeline", "demo", "generate", "iterate"} <= computing
    assert not computing & {"decide", "report", "review", "plan", "objectives"}


def test_busy_cpus_sees_a_busy_process():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<5: pass"])
    try:
        busy = cpus.busy_cpus(0.5)
    finally:
        spin.kill()
    assert busy is not None and busy >= 0.5, busy  # one spinning process keeps (nearly) one CPU busy

