"""Run an lkv_jax experiment on a Cloud TPU VM: a single host (v5e-8, v5p-8, ...) or a multi-host pod
slice (v5p-32, v4-64, ...), on every worker at once.

    python experiments/launch_tpu_vm.py --name lkv --zone us-east5-a --accelerator v5p-32 \\
        --checkpoint gs://my-bucket/llama-3.1-8b-orbax --data gs://my-bucket/labels \\
        -- experiments/train_lookahead.py --config experiments/configs/llama-3.1-8b.json

Steps, each an ordinary gcloud command (print them with --dry-run, nothing runs then):
  1. create the TPU VM, or reuse it when `describe` finds it (--reuse-only never creates);
  2. copy this repository to every worker (a git archive of HEAD) and install it in a virtualenv with
     jax[tpu] pinned to the version the project uses;
  3. copy the converted checkpoint and the data to every worker's local disk (gcloud storage cp) or,
     with --mount, mount the bucket with gcsfuse;
  4. run the experiment on all workers (`gcloud compute tpus tpu-vm ssh --worker=all`) with the
     environment multi-host JAX needs: LKV_DISTRIBUTED=1 makes the entry script call
     `jax.distributed.initialize()`, which on TPU VMs discovers the coordinator and process ids itself.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass

JAX_VERSION = "0.10.2"
REMOTE_DIR = "lkv_jax"


@dataclass(frozen=True)
class TpuTarget:
    name: str
    zone: str
    accelerator: str
    version: str = "tpu-ubuntu2204-base"
    project: str | None = None
    spot: bool = False

    def gcloud(self, *args: str) -> list[str]:
        cmd = ["gcloud", "compute", "tpus", "tpu-vm", *args, self.name, f"--zone={self.zone}"]
        if self.project:
            cmd.append(f"--project={self.project}")
        return cmd


def describe_cmd(t: TpuTarget) -> list[str]:
    return t.gcloud("describe")


def create_cmd(t: TpuTarget) -> list[str]:
    cmd = t.gcloud("create") + [f"--accelerator-type={t.accelerator}", f"--version={t.version}"]
    if t.spot:
        cmd.append("--spot")
    return cmd


def ssh_all(t: TpuTarget, command: str) -> list[str]:
    return t.gcloud("ssh") + ["--worker=all", f"--command={command}"]


def copy_repo_cmds(t: TpuTarget, archive: str = "/tmp/lkv_jax.tar.gz") -> list[list[str]]:
    scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{t.name}:{archive}", f"--zone={t.zone}",
           "--worker=all"] + ([f"--project={t.project}"] if t.project else [])
    return [
        ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
        scp,
        ssh_all(t, f"mkdir -p {REMOTE_DIR} && tar -xzf {archive} -C {REMOTE_DIR}"),
    ]


def install_cmd(t: TpuTarget) -> list[str]:
    steps = (f"cd {REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q --upgrade pip && "
             f".venv/bin/pip install -q 'jax[tpu]=={JAX_VERSION}' && .venv/bin/pip install -q -e .")
    return ssh_all(t, steps)


def data_cmds(t: TpuTarget, sources: list[str], mount: bool) -> list[list[str]]:
    cmds = []
    for src in sources:
        if mount:
            bucket = src.removeprefix("gs://").split("/", 1)[0]
            cmds.append(ssh_all(t, f"mkdir -p ~/gcs/{bucket} && gcsfuse --implicit-dirs {bucket} ~/gcs/{bucket}"))
        else:
            cmds.append(ssh_all(t, f"mkdir -p ~/data && gcloud storage cp -r {shlex.quote(src)} ~/data/"))
    return cmds


def run_cmd(t: TpuTarget, script_args: list[str], env: dict[str, str]) -> list[str]:
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    argv = " ".join(shlex.quote(a) for a in script_args)
    return ssh_all(t, f"cd {REMOTE_DIR} && {exports} .venv/bin/python {argv}")


def plan(args) -> list[tuple[str, list[str]]]:
    """The commands to run, in order, as (what, argv)."""
    t = TpuTarget(args.name, args.zone, args.accelerator, args.version, args.project, args.spot)
    steps: list[tuple[str, list[str]]] = []
    if not args.skip_create:
        steps.append(("create (skipped if describe finds the VM)", create_cmd(t)))
    if not args.skip_setup:
        steps += [("copy repository", c) for c in copy_repo_cmds(t)]
        steps.append(("install", install_cmd(t)))
    steps += [("data", c) for c in data_cmds(t, [s for s in (args.checkpoint, args.data) if s], args.mount)]
    # initialise jax.distributed on every worker (on a single host it is a harmless one-process group)
    env = {"LKV_DISTRIBUTED": "1", "PYTHONUNBUFFERED": "1"}
    env.update(dict(kv.split("=", 1) for kv in args.env))
    if args.script:
        steps.append(("run on all workers", run_cmd(t, args.script, env)))
    return steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="TPU VM name")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--accelerator", default="v5p-8", help="accelerator type, e.g. v5e-8, v5p-32")
    ap.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime image")
    ap.add_argument("--project", default=None)
    ap.add_argument("--spot", action="store_true", help="create a spot VM")
    ap.add_argument("--checkpoint", default=None, help="gs:// path of a converted (orbax) checkpoint")
    ap.add_argument("--data", default=None, help="gs:// path of the label dataset / eval data")
    ap.add_argument("--mount", action="store_true", help="gcsfuse-mount the buckets instead of copying")
    ap.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the run")
    ap.add_argument("--skip-create", action="store_true", help="reuse an existing VM without checking")
    ap.add_argument("--skip-setup", action="store_true", help="do not copy/install the repository again")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("script", nargs=argparse.REMAINDER, help="-- then the experiment script and its arguments")
    args = ap.parse_args(argv)
    if args.script and args.script[0] == "--":
        args.script = args.script[1:]
    t = TpuTarget(args.name, args.zone, args.accelerator, args.version, args.project, args.spot)
    for what, cmd in plan(args):
        print(f"# {what}\n{shlex.join(cmd)}")
        if args.dry_run:
            continue
        if what.startswith("create") and subprocess.run(describe_cmd(t), capture_output=True).returncode == 0:
            print("# exists: reusing it")
            continue
        subprocess.run(cmd, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
