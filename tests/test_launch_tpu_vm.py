"""The TPU VM launcher's commands, checked through --dry-run (it cannot run here)."""

from __future__ import annotations

import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_prints_the_full_plan(capsys, experiment_script):
    launcher = experiment_script("launch_tpu_vm")
    rc = launcher.main(["--name", "lkv", "--zone", "us-east5-a", "--accelerator", "v5p-32",
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


def test_mount_and_reuse(capsys, experiment_script):
    launcher = experiment_script("launch_tpu_vm")
    launcher.main(["--name", "x", "--zone", "z", "--checkpoint", "gs://bkt/ck", "--mount", "--skip-create",
                   "--skip-setup", "--project", "p", "--dry-run", "--", "experiments/eval.py"])
    out = capsys.readouterr().out
    assert "create" not in out and "git archive" not in out
    assert "gcsfuse --implicit-dirs bkt" in out and "--project=p" in out


def test_ready_configs_expand_to_lkv_commands(capsys, experiment_script):
    module = experiment_script("run_config")
    configs = sorted((ROOT / "experiments" / "configs").glob("*.json"))
    assert {c.stem for c in configs} >= {"llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "qwen3-1.7b", "qwen3-4b",
                                         "qwen3-8b"}
    for c in configs:
        assert module.main([str(c), "all", "--dry-run"]) == 0
        labels, train, evaluate = [shlex.split(x) for x in capsys.readouterr().out.splitlines()]
        assert [labels[:2], train[:2], evaluate[:2]] == [["lkv", "make-labels"], ["lkv", "train"], ["lkv", "eval"]]
        # the paper's settings
        for flag, value in (("--n-lookahead", "32"), ("--rank", "8"), ("--alpha", "32")):
            assert train[train.index(flag) + 1] == value
        assert train[train.index("--targets") + 1] == "q,k,v,o,gate,up,down"
        assert evaluate[evaluate.index("--budgets") + 1] == "64,128,256,512,1024,2048"
        # every flag is one the lkv subcommand accepts
        from lkv_jax.cli import build_parser

        for argv in (labels[1:], train[1:], evaluate[1:]):
            build_parser().parse_args(argv)


def test_run_config_mesh_reaches_lkv_train(capsys, experiment_script):
    module = experiment_script("run_config")
    assert module.main([str(ROOT / "experiments" / "configs" / "llama-3.1-8b.json"), "train", "--mesh", "4,4,1",
                        "--dry-run"]) == 0
    train = shlex.split(capsys.readouterr().out)
    assert train[train.index("--mesh") + 1] == "4,4,1"
    from lkv_jax.cli import build_parser
    from lkv_jax.commands.train import config_from_args

    assert config_from_args(build_parser().parse_args(train[1:])).mesh == (4, 4, 1)
