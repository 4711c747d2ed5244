"""Training throughput of ``ddfm train`` against a minimal plain PyTorch loop.

    python benchmarks/bench_train.py [--steps 60] [--batch-size 16] [--rounds 3] [--data TRAIN.jsonl]

Both sides train the same ``tiny-llava`` model with the same parts learning, one
``--modes`` entry at a time: ``full`` (vision tower frozen, projector and language model
trained: the ``llava`` recipe), ``lora`` (the same, but the language model through rank
``--lora`` adapters of peft on its attention and MLP projections, the plain side building
them with ``peft.get_peft_model`` as its documentation shows) and ``projector`` (only the
projector learns: ``--train projector``), on the same batches of real images (Fashion-MNIST + scikit-learn digits, with
``ddfm prepare`` when it is available) in one process. The plain loop is forward with
``labels``, backward, AdamW step. ``ddfm train`` adds everything it does for real
(global token-normalised loss, gradient clipping, lr schedule, JSON Lines log).
Tokens/s count every input token (prompt, image placeholders, answer) after the first
``--skip`` warm-up steps; rounds alternate the two sides and the median is reported.
Both wall-clock and CPU-time rates are printed: on a machine shared with other jobs
the CPU-time ratio (with ``--threads 1``) is the steadier one. Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import paired_summary, write_results  # noqa: E402

from ddfm.init import InitConfig, init  # noqa: E402
from ddfm.model.checkpoint import load_model  # noqa: E402
from ddfm.train import TrainConfig, collate, encode_shard, sample_order, train  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
NAMES = ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def real_data(out: Path, n: int = 400, with_text: bool = False) -> Path:
    """Training records of real images: ``ddfm prepare mix`` if present, else Fashion-MNIST directly.

    Without ``with_text`` the mix's text-only docs passages are left out: image records
    all have ~40 tokens, so ddfm's length grouping changes nothing and the ratio measures
    the loop's own overhead. With them, grouping avoids padding and ddfm is much faster.
    """
    try:
        from ddfm.prepare import PrepareConfig, prepare
        cfg = PrepareConfig(source="mix", out=str(out / "mix"), train_size=n, test_size=50)
        path = Path(prepare(cfg)) / "train.jsonl"
        if not with_text:
            lines = [line for line in path.read_text().splitlines() if json.loads(line).get("image")]
            path = path.with_name("train-images.jsonl")
            path.write_text("".join(line + "\n" for line in lines))
        return path
    except ImportError:
        pass
    from PIL import Image

    (out / "images").mkdir(parents=True, exist_ok=True)
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    rows = []
    for i in range(n):
        Image.fromarray(images[i]).save(out / f"images/{i}.png")
        rows.append({"id": str(i), "image": f"images/{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                       {"from": "gpt", "value": f"A {NAMES[labels[i]]}."}]})
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def plain_loop(init_dir: Path, data: Path, steps: int, batch_size: int, lr: float, skip: int,
               mode: str = "full", rank: int = 8) -> tuple[float, float]:
    """Minimal loop: forward(labels) -> backward -> AdamW.step, on ddfm's batches, with
    ``mode``'s parts learning (see the module docstring).

    Returns tokens per wall second and per CPU second of this process."""
    model, processor = load_model(init_dir)
    examples, pixels, _ = encode_shard(str(data), processor, model)
    pad = processor.tokenizer.pad_token_id
    learns = {"full": ("multi_modal_projector", "language_model", "lm_head"), "lora": ("multi_modal_projector",),
              "projector": ("multi_modal_projector",)}[mode]
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in name for part in learns))
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "language_model" in n
                   and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj")]
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad or "multi_modal_projector" in name)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tokens, t0, c0 = 0, 0.0, 0.0
    for step in range(steps):
        if step == skip:
            t0, c0, tokens = time.perf_counter(), time.process_time(), 0
        idx = sample_order(len(examples), 0, step * batch_size, batch_size)
        batch = collate([examples[i] for i in idx], pixels, pad)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += sum(len(examples[i].input_ids) for i in idx)
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def ddfm_loop(init_dir: Path, data: Path, out: Path, steps: int, batch_size: int, lr: float,
              skip: int, mode: str = "full", rank: int = 8) -> tuple[float, float]:
    """``ddfm.train.train`` itself with ``mode``'s options; tokens per wall / CPU second
    from its own log, same steps (the final merge and save are not timed, as on the plain side)."""
    options = {"full": {"train": "llava"}, "lora": {"train": "llava", "lora": rank, "lora_alpha": 16.0},
               "projector": {"train": "projector"}}[mode]
    train(TrainConfig(init=str(init_dir), data=str(data), out=str(out), steps=steps, batch_size=batch_size,
                      lr=lr, save_every=0, seed=0, **options))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    timed = rows[skip:]
    tokens = sum(r["tokens"] for r in timed)
    return (tokens / (rows[-1]["elapsed"] - rows[skip - 1]["elapsed"]),
            tokens / (rows[-1]["cpu_s"] - rows[skip - 1]["cpu_s"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the timing")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                   help="torch threads (1 gives steadier numbers on a busy machine)")
    p.add_argument("--with-text", action="store_true",
                   help="keep the mix's text-only passages (shows the gain of length grouping)")
    p.add_argument("--data", default=None, help="training JSONL (default: ddfm prepare mix, small)")
    p.add_argument("--json", default=None, help="also write the results here (with provenance)")
    p.add_argument("--modes", nargs="+", choices=["full", "lora", "projector"], default=["full", "lora", "projector"],
                   help="what learns (module docstring)")
    p.add_argument("--lora", type=int, default=8, help="LoRA rank of the lora mode")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else real_data(tmp / "data", with_text=args.with_text)
        init_dir = init(InitConfig(preset="tiny-llava", data=str(data), out=str(tmp / "init")))
        for mode in args.modes:
            print(f"== {mode}", flush=True)
            plain, ours = [], []
            for r in range(args.rounds):
                plain.append(plain_loop(init_dir, data, args.steps, args.batch_size, 1e-3, args.skip, mode, args.lora))
                ours.append(ddfm_loop(init_dir, data, tmp / f"{mode}-{r}", args.steps, args.batch_size, 1e-3,
                                      args.skip, mode, args.lora))
                print(f"round {r + 1}: plain {plain[-1][0]:7.0f} tok/s ({plain[-1][1]:7.0f} per CPU-s)   "
                      f"ddfm train {ours[-1][0]:7.0f} tok/s ({ours[-1][1]:7.0f} per CPU-s)", flush=True)
            results[mode] = paired_summary(plain, ours, ("tokens/s (wall)", "tokens/CPU-s"),
                                           ("plain PyTorch loop", "ddfm train"),
                                           f"{mode}; target >= 0.95; {args.rounds} rounds")
    if args.json:
        settings = {k: getattr(args, k) for k in ("steps", "batch_size", "rounds", "skip", "threads", "with_text",
                                                  "modes", "lora")}
        write_results(args.json, {"settings": {**settings, "data": args.data or "ddfm prepare mix"}, **results})


if __name__ == "__main__":
    main()
