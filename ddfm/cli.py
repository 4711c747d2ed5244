"""The ``ddfm`` command line; ``ddfm --help`` prints :data:`DESCRIPTION` and the commands.

One table (:data:`COMMANDS`) maps each subcommand to ``module:Config:function``; the
module is imported only when its subcommand runs, so ``ddfm --help`` stays fast and a
stage's heavy imports (torch, transformers, fastapi) cost nothing to the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ddfm.config import add_arguments, from_namespace

DESCRIPTION = """\
Train a vision-language model (or a language model) as K experts that never talk to
each other, each on one cluster of the data, then generate with them together as one
model (Decentralized Autoregressive Generation).

The pipeline, one command per stage:
  ddfm prepare mix --out data/mix                     real data -> LLaVA-style JSON Lines
  ddfm embed data/mix/train.jsonl --out runs/features image (or text) features
  ddfm partition data/mix/train.jsonl --features runs/features -k 2 --out runs/partition
  ddfm init --preset tiny-llava --out runs/init       the checkpoint every run starts from
  ddfm train --init runs/init --data runs/partition/shard-00.jsonl --out runs/expert-0 ...
  ddfm generate | eval | serve --experts runs/expert-0 runs/expert-1 --router runs/partition

`ddfm demo` runs all of it on the embedded data and writes REPORT.md;
`ddfm COMMAND --help` lists a command's options."""

# name -> ("module:ConfigClass:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("ddfm.prepare:PrepareConfig:prepare",
                "turn a real offline source into canonical JSON Lines records"),
    "embed": ("ddfm.embed:EmbedConfig:embed",
              "features of every unique image (or text) with a registered encoder"),
    "partition": ("ddfm.partition:PartitionConfig:partition",
                  "balanced k-means into K shards + router file + report"),
    "init": ("ddfm.init:InitConfig:init",
             "write the initial checkpoint (tokenizer + model) from a preset"),
    "train": ("ddfm.train:TrainConfig:train",
              "train the dense baseline or one expert on one shard"),
    "generate": ("ddfm.ensemble:GenerateConfig:generate_cli",
                 "generate with K experts + router as one model"),
    "eval": ("ddfm.evaluate:EvalConfig:evaluate_cli",
             "accuracy and perplexity of a model or an ensemble on a test file"),
    "demo": ("ddfm.demo:DemoConfig:demo",
             "the whole method on the embedded real data, with REPORT.md"),
    "ablate": ("ddfm.ablate:AblateConfig:ablate",
               "the paper's ablations (K, encoder, clustering, routing) in one table"),
    "tasks": ("ddfm.harness:TasksConfig:write_tasks",
              "task files for lm-evaluation-harness and lmms-eval over prepared test data"),
    "serve": ("ddfm.serve.cli:ServeConfig:serve",
              "OpenAI-compatible HTTP API over the ensemble"),
    "theory": ("ddfm.theory:TheoryConfig:theory_cli",
               "check the paper's identities exactly and print the residuals"),
}


class UsageError(Exception):
    """Bad input detected by a stage; printed as ``ddfm <cmd>: error: ...`` with exit 2."""


def _resolve(spec: str):
    module_name, config_name, fn_name = spec.split(":")
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, fn_name)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddfm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (spec, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that runs
            config_cls, _ = _resolve(spec)
            add_arguments(p, config_cls)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # faiss logs at INFO which of its builds it tries to load (AVX512, AVX2, ...) on every
    # import: not our users' business
    logging.getLogger("faiss").setLevel(logging.WARNING)
    # transformers 5 draws a "Loading weights" bar for every checkpoint it opens, dozens in
    # a demo; our stages show their own progress. Set before transformers is imported; a
    # user's own HF_HUB_DISABLE_PROGRESS_BARS=0 wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    config_cls, fn = _resolve(COMMANDS[ns.command][0])
    try:
        cfg = from_namespace(config_cls, ns)
        fn(cfg)
    except (ValueError, FileNotFoundError, UsageError) as err:
        print(f"ddfm {ns.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddfm {ns.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
