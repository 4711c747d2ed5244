"""What every command shares at run time: the device, progress, and rank-0 logging.

    from ddfm.runtime import resolve_device, progress, is_main_process
    device = resolve_device("auto")              # "cuda" where torch sees one, else "cpu"
    with progress(len(items), "embed") as bar:   # tqdm on a terminal, plain lines in logs
        bar.update(len(batch))
"""

from ddfm.runtime.device import DEVICE_HELP, check_device, resolve_device
from ddfm.runtime.distributed import is_main_process, local_rank, rank, world_size
from ddfm.runtime.progress import Progress, progress, track
from ddfm.runtime.provenance import provenance, versions

__all__ = ["DEVICE_HELP", "check_device", "resolve_device", "Progress", "progress", "track", "is_main_process",
           "local_rank", "rank", "world_size", "provenance", "versions"]
