"""``graftr train RECIPE --model MODEL --data DATA [--out DIR] [--resume] [--nproc N] [path.to.field=value ...]``.

One process runs the loop itself (DeepSpeed with a process group of one). ``--nproc N`` re-runs the same command
under the DeepSpeed launcher, ``python -m deepspeed.launcher.runner --num_gpus N --module graftr.cli train ...``,
which starts N processes per node (one per GPU; on a machine without GPUs, N CPU processes talking over gloo),
passing ``--num_nodes``/``--hostfile``/``--master_addr``/``--master_port`` through. A process started by any
launcher (``deepspeed``, ``torchrun``: ``LOCAL_RANK`` and ``WORLD_SIZE`` set) runs the loop as its rank.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from graftr.cliargs import collect_overrides
from graftr.train.distributed import free_port, launched


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the recipe YAML; its train: section says how to train")
    parser.add_argument("--model", help="a model directory with safetensors weights, a cached hub id, or a hub id "
                                        "an installed package ships (default: the recipe's model)")
    parser.add_argument("--data", required=True, help="a data file, a directory of split files (train.jsonl, "
                                                      "validation.jsonl, ...) or a hub dataset in the local cache")
    parser.add_argument("--out", help="output directory: adapter/, checkpoints/, metrics.jsonl "
                                      "(default: runs/<recipe name>)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument("--nproc", type=int, help="processes per node (GPUs, or CPU processes without GPUs), "
                                                  "started through the DeepSpeed launcher")
    parser.add_argument("--num-nodes", type=int, help="with --nproc: nodes to use from the hostfile")
    parser.add_argument("--hostfile", help="with --nproc: DeepSpeed hostfile (`host slots=N` lines) for several nodes")
    parser.add_argument("--master-addr", help="with --nproc: address of rank 0 (default: first host, or 127.0.0.1)")
    parser.add_argument("--master-port", type=int, help="with --nproc: rendezvous port (default: a free port)")
    parser.add_argument("overrides", nargs="*", metavar="path.to.field=value",
                        help="recipe overrides applied before validation, e.g. train.max_steps=20 train.zero_stage=3")
    collect_overrides(parser)


def _relaunch(args, recipe_name: str) -> int:
    """Run this command again under the DeepSpeed launcher with ``--nproc`` processes per node."""
    from graftr.quiet import is_verbose

    # the launcher's own notes ("Unable to find hostfile", "Setting accelerator to CPU") are warnings: shown only
    # with --verbose; its errors still print
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.nproc),
               "--master_port", str(args.master_port or free_port()), "--no_local_rank", "--log_level",
               "warning" if is_verbose() else "error"]
    if args.num_nodes is not None:
        command += ["--num_nodes", str(args.num_nodes)]
    if args.hostfile is not None:
        command += ["--hostfile", args.hostfile]
    if args.master_addr is not None:
        command += ["--master_addr", args.master_addr]
    command += ["--module", "graftr.cli", "train", args.recipe, "--data", args.data,
                "--out", args.out or os.path.join("runs", recipe_name)]
    if args.model:
        command += ["--model", args.model]
    if args.resume:
        command.append("--resume")
    command += args.overrides
    env = dict(os.environ)
    if "DS_ACCELERATOR" not in env:  # what DeepSpeed would detect, said up front: its launchers do not warn of it
        import torch

        env["DS_ACCELERATOR"] = "cuda" if torch.cuda.device_count() > 0 and torch.cuda.is_available() else "cpu"
    if "OMP_NUM_THREADS" not in env:  # N CPU processes share the cores instead of each taking all of them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    return subprocess.run(command, env=env).returncode


def main(args) -> int:
    from graftr.console import console
    from graftr.errors import GraftrError
    from graftr.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.train is None:  # every field has a default: the format from the data, lr from the adapter kinds
        from graftr.train.config import TrainConfig

        recipe.train = TrainConfig()
    if args.nproc is not None and args.nproc < 1:
        raise GraftrError(f"--nproc must be >= 1, got {args.nproc}")
    multi = [flag for flag, value in (("--num-nodes", args.num_nodes), ("--hostfile", args.hostfile),
                                      ("--master-addr", args.master_addr), ("--master-port", args.master_port))
             if value is not None]
    if multi and args.nproc is None:
        raise GraftrError(f"{', '.join(multi)} only apply with --nproc (the launcher uses them)")
    if args.nproc is not None and not launched():
        return _relaunch(args, recipe.name)

    from graftr.train.loop import train

    rank = int(os.environ.get("RANK", "0"))
    try:
        train(recipe, model_id=args.model or recipe.model, data=args.data,
              out=args.out or os.path.join("runs", recipe.name), resume=args.resume, console=console)
    except GraftrError:
        if rank != 0:  # every rank stops on the same error; rank 0 reports it once
            return 2
        raise
    return 0
