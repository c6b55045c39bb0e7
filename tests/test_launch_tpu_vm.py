"""The TPU VM launcher's commands, checked through --dry-run (it cannot run here)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_tpu_vm", ROOT / "experiments" / "launch_tpu_vm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_full_plan(capsys):
    rc = _launcher().main(["--name", "lkv", "--zone", "us-east5-a", "--accelerator", "v5p-32",
                           "--checkpoint", "gs://bkt/ckpt", "--data", "gs://bkt/labels", "--dry-run", "--",
                           "experiments/train_lookahead.py", "--steps", "100"])
    assert rc == 0
    lines = [shlex.split(x) for x in capsys.readouterr().out.splitlines() if x and not x.startswith("#")]
    assert lines[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--accelerator-type=v5p-32" in lines[0] and "--zone=us-east5-a" in lines[0]
    assert lines[1][:2] == ["git", "archive"]
    ssh = [x for x in lines if x[4:5] == ["ssh"]]
    assert all("--worker=all" in x for x in ssh)
    assert any("jax[tpu]==0.10.2" in x[-1] for x in ssh)
    assert sum("gcloud storage cp -r gs://bkt/" in x[-1] for x in ssh) == 2
    run = ssh[-1][-1]
    assert run.startswith("--command=cd lkv_jax && ")
    assert "LKV_DISTRIBUTED=1" in run and run.endswith(".venv/bin/python experiments/train_lookahead.py --steps 100")


def test_mount_and_reuse(capsys):
    _launcher().main(["--name", "x", "--zone", "z", "--checkpoint", "gs://bkt/ck", "--mount", "--skip-create",
                      "--skip-setup", "--project", "p", "--dry-run", "--", "experiments/eval.py"])
    out = capsys.readouterr().out
    assert "create" not in out and "git archive" not in out
    assert "gcsfuse --implicit-dirs bkt" in out and "--project=p" in out
