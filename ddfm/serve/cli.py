"""``ddfm serve``: its configuration (:class:`ServeConfig`, mirrored by the CLI) and :func:`serve`."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ddfm.config import arg
from ddfm.ensemble.config import EnsembleConfig
from ddfm.sampling import MAX_NEW_TOKENS
from ddfm.serve.app import create_app
from ddfm.serve.connections import uvicorn_config
from ddfm.serve.gateway import parse_upstreams

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "serve"]


@dataclass
class ServeConfig:
    """``ddfm serve``: the ensemble (or a gateway to remote experts) behind an OpenAI-style API."""

    ensemble: EnsembleConfig = arg("the ensemble (shared by generate, eval and serve); in gateway mode only "
                                   "--router and --router-temperature apply", default_factory=EnsembleConfig)
    model_name: str = arg("model id reported by /v1/models and accepted in requests", default="ddfm")
    host: str = arg("address to bind; 127.0.0.1 keeps the server local", default="127.0.0.1")
    port: int = arg("TCP port", default=8000)
    api_key: Optional[str] = arg("require 'Authorization: Bearer KEY' on every endpoint but the liveness probe "
                                 "(GET /health without details). On the command line the key is visible to every "
                                 "user of the machine (ps): prefer env DDFM_API_KEY or --api-key-file", default=None)
    api_key_file: Optional[str] = arg("read the API key from this file (its first line)", default=None)
    allowed_hosts: list[str] = arg("Host header values accepted (requests naming another host get 421: DNS "
                                   "rebinding); '*' accepts any (default: --host, localhost, 127.0.0.1, ::1)",
                                   default_factory=list)
    max_body_bytes: int = arg("largest request body in bytes", default=8 * 1024 * 1024)
    max_image_pixels: int = arg("largest image (width x height, read from its header before decoding) accepted",
                                default=4096 * 4096)
    max_image_aspect: float = arg("largest ratio of an image's long side to its short side (thinner images are "
                                  "refused: a processor would scale the short side up)", default=20.0)
    max_prompt_tokens: int = arg("longest prompt in tokens (image tokens included)", default=2048)
    max_output_tokens: int = arg("largest max_tokens a request may ask for", default=512)
    default_max_tokens: Optional[int] = arg("chat max_tokens when a request gives none (default: ddfm.sampling.MAX_NEW_TOKENS, at most "
                                            "max_output_tokens; /v1/completions defaults to 16 as OpenAI's)",
                                            default=None)
    max_concurrent: int = arg("completion requests in flight before new ones get 429 (idle connections do not "
                              "count)", default=64)
    max_connections: int = arg("open connections; beyond this the longest idle one is closed", default=1000)
    header_timeout: float = arg("seconds a connection may take to send a request's headers, from connecting or "
                                "from the first byte of a later request (then it is closed)", default=10.0)
    max_header_bytes: int = arg("largest request head (request line and headers) in bytes (then 431)",
                                default=64 * 1024)
    keep_alive_timeout: float = arg("seconds an idle keep-alive connection stays open between requests",
                                    default=5.0)
    body_timeout: float = arg("seconds a client may take to send its request body (then 408)", default=30.0)
    max_batch_size: int = arg("rows (prompts) decoded together in the running batch; more wait for a free row",
                              default=16)
    batch_window_ms: float = arg("when idle, how long the batcher waits for requests already in flight to "
                                 "arrive, so they start together", default=5.0)
    allow_remote_images: bool = arg("accept http(s):// image URLs (fetched by the server)", default=False)
    image_root: Optional[str] = arg("accept file:// URLs and paths to images under this directory", default=None)
    upstream: list[str] = arg("gateway mode: k=URL of expert k's OpenAI-compatible server (one per expert)",
                              default_factory=list)
    upstream_timeout: float = arg("seconds to wait for an upstream expert's response", default=60.0)
    upstream_connect_timeout: float = arg("seconds to wait for a connection to an upstream expert", default=3.0)
    upstream_api_key: Optional[str] = arg("bearer key sent to upstream experts", default=None)
    log_level: str = arg("uvicorn log level", default="info",
                         choices=("critical", "error", "warning", "info", "debug"))

    def __post_init__(self) -> None:
        self.upstream = [str(u) for u in self.upstream]
        if not self.ensemble.experts and not self.upstream:
            raise ValueError("serve: give --experts DIR... (local experts) or --upstream k=URL... (gateway mode)")
        if self.ensemble.experts and self.upstream:
            raise ValueError("serve: --experts and --upstream exclude each other (gateway mode forwards, "
                             "it does not load experts)")
        if self.default_max_tokens is None:
            self.default_max_tokens = min(MAX_NEW_TOKENS, self.max_output_tokens)
        for name in ("port", "max_body_bytes", "max_image_pixels", "max_prompt_tokens", "max_output_tokens",
                     "default_max_tokens", "max_concurrent", "max_connections", "max_header_bytes", "max_batch_size",
                     "header_timeout", "keep_alive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_output_tokens "
                             f"({self.max_output_tokens})")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms: must be >= 0, got {self.batch_window_ms}")
        if self.max_image_aspect < 1:
            raise ValueError(f"max_image_aspect: must be >= 1 (long side / short side), got {self.max_image_aspect}")
        if self.body_timeout <= 0:
            raise ValueError(f"body_timeout: must be positive, got {self.body_timeout}")
        if self.upstream_timeout <= 0 or self.upstream_connect_timeout <= 0:
            raise ValueError("upstream_timeout and upstream_connect_timeout must be positive")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise FileNotFoundError(f"image_root: not a directory: {self.image_root}")
        if self.upstream:
            if len(parse_upstreams(self.upstream)) > 1 and self.ensemble.router is None:
                raise ValueError("upstream: gateway mode with several experts needs --router to route requests")
        self.allowed_hosts = [str(h) for h in self.allowed_hosts]
        self.api_key = self._resolve_api_key()

    def _resolve_api_key(self) -> Optional[str]:
        """--api-key, else the first line of --api-key-file, else env DDFM_API_KEY, else None."""
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: must not be empty")
        if self.api_key_file is None:
            return self.api_key or os.environ.get("DDFM_API_KEY") or None
        path = Path(self.api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"api_key_file: no such file: {path}")
        key = (path.read_text().splitlines() or [""])[0].strip()
        if not key:
            raise ValueError(f"api_key_file: {path} is empty (the key is its first line)")
        if self.api_key is not None and self.api_key != key:
            raise ValueError("api_key and api_key_file: give one of them")
        if path.stat().st_mode & 0o077:
            log.warning("api_key_file %s can be read by other users of this machine (chmod 600 it)", path)
        return key

    def hosts(self) -> Optional[set[str]]:
        """The Host header values accepted (lower case, no port), or None for any ('*')."""
        if "*" in self.allowed_hosts:
            return None
        given = self.allowed_hosts or [self.host, "localhost", "127.0.0.1", "::1"]
        return {h.strip().strip("[]").rstrip(".").lower() for h in given}


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted (``ddfm serve``); on SIGINT/SIGTERM it stops accepting,
    finishes the responses in flight (streams included), then stops the batcher."""
    import uvicorn

    if cfg.api_key and any(cfg.api_key in a for a in sys.argv):
        log.warning("the API key was given with --api-key: every user of this machine can read it in the process "
                    "list (ps); pass it in env DDFM_API_KEY or with --api-key-file instead")
    app = create_app(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without an API key: anyone who can reach this address can use it", cfg.host)
    if cfg.host in ("0.0.0.0", "::") and not cfg.allowed_hosts:
        log.warning("bound to all interfaces but only Host headers naming localhost are accepted: give the names "
                    "clients use with --allowed-hosts")
    _raise_open_files_limit(cfg.max_connections + 64)
    log.info("ddfm serve: %s backend, model %r on http://%s:%d/v1 (API docs at /docs)",
             app.state.ddfm.backend.kind, cfg.model_name, cfg.host, cfg.port)
    uvicorn.Server(uvicorn_config(app, cfg)).run()


def _raise_open_files_limit(wanted: int) -> None:
    """Each connection is a file descriptor: raise the soft limit toward ``wanted`` (up to the hard limit)."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning("open files limited to %d (ulimit -Hn): fewer than --max-connections %d allows", target, wanted)
