"""Train the dense baseline or one expert on one shard (paper §4.1, §5.1–5.2).

    ddfm train --init runs/init --data data/mix/train.jsonl --out runs/dense --steps 400 --batch-size 32
    ddfm train --init runs/init --data runs/partition/shard-01.jsonl --out runs/expert-01 \\
        --match dense:400,32,4            # expert: the dense run's 400 steps at batch 32/4 = 8
    torchrun --nproc_per_node=2 -m ddfm train ...     # one expert data-parallel (DDP)
    torchrun --nproc_per_node=8 -m ddfm train --fsdp --activation-checkpointing --bf16 ...   # sharded (FSDP2)

Every expert is an ordinary, independent training job started from the same initial
checkpoint as the dense baseline. ``--train`` picks what learns: the ``llava`` recipe
(projector + language model, vision tower frozen), ``internvl`` (everything), ``align``
(the projector) or any comma list of ``vision``, ``projector``, ``language``; without it,
the recipe of the model's family (``ddfm.model.families.Family.recipe``: a causal LM trains
its one part, ``language``). Only assistant tokens are in the loss (LLaVA convention); the
loss of a step is the mean over the assistant tokens of the whole global batch, whatever
the split into ranks and micro-batches.

The data order is a pure function of ``(seed, step)`` (:mod:`ddfm.train.data`). A resume
state every ``--save-every`` steps lets ``--resume`` continue bit for bit where a killed
job stopped (:mod:`ddfm.train.state`). ``--fsdp`` shards parameters, gradients and
optimizer state over the ranks, one unit per transformer block (:mod:`ddfm.train.fsdp`),
for experts that do not fit one device; the final checkpoint is gathered into one ordinary
Hugging Face directory. Records whose image is missing or unreadable are skipped with
every record sharing the image, named in one log line and listed in ``ddfm.json``
"skipped_images" (file, line, id, image, reason).

Output directory: the final Hugging Face checkpoint (``config.json``, ``model.safetensors``,
processor files) + ``ddfm.json`` (shard, cluster id, init checkpoint -- paths relative to
this directory, :func:`ddfm.model.checkpoint.read_meta` resolves them -- compute, seed, versions,
skipped records) + ``log.jsonl`` (one line per step) + ``resume/state.pt`` (latest
resume state; under ``--fsdp`` without model and optimizer, which are in ``resume/sharded-STEP/``).

The package, one job per file: ``config`` (TrainConfig, parts, recipes, ``--match``),
``data`` (encoding, order, batch split, collation), ``state`` (resume state, counters,
clock, log.jsonl), ``fsdp`` (sharded training), ``loop`` (:func:`train` and the losses).
"""

from ddfm.train.config import PARTS, RECIPES, TrainConfig, parse_match, parse_parts, resolve_recipe
from ddfm.train.data import (
    IGNORE,
    Example,
    ballast_example,
    collate,
    encode_shard,
    length_groups,
    rank_groups,
    sample_order,
)
from ddfm.train.loop import answer_nll, held_out_loss, set_trainable, train
from ddfm.train.state import STATE_FILE, examples_digest, load_state, save_state, truncate_log

__all__ = ["PARTS", "RECIPES", "TrainConfig", "parse_match", "parse_parts", "resolve_recipe", "IGNORE", "Example",
           "ballast_example", "collate", "encode_shard", "length_groups", "rank_groups", "sample_order", "answer_nll",
           "held_out_loss", "set_trainable", "train", "STATE_FILE", "examples_digest", "load_state", "save_state",
           "truncate_log"]
