"""``cuma serve``: load a model (with its adapter), start the engine worker, serve HTTP with uvicorn.

    cuma serve --model smollm2-135m --adapter runs/demo/adapters/cuma            # http://127.0.0.1:8000/
    cuma serve --model smollm2-135m --method persona --port 8001 --api-key KEY    # or CUMA_API_KEY=KEY
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import Optional

__all__ = ["add_arguments", "run"]


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="base model: 'smollm2-135m' (embedded default), a "
                        "local folder or a hub id")
    parser.add_argument("--adapter", default=None, help="folder of a trained method (cuma_method.json + adapter); "
                        "its training record says which profile encoder and prompt style it was trained with")
    parser.add_argument("--method", default=None, choices=["persona", "base"],
                        help="without --adapter: persona (profile sentence in the system prompt) or base (default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--served-name", default=None, help="model id in /v1/models and requests (default: the "
                        "adapter folder's name, else --model)")
    parser.add_argument("--max-batch-size", type=_positive("--max-batch-size"), default=16,
                        help="rows decoded together (default 16; 1 = no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="when idle, how long the first request waits "
                        "for others to share its prefill (default 10)")
    parser.add_argument("--max-queue", type=_positive("--max-queue"), default=256, help="sequences that may wait "
                        "beyond the free rows; more get 429 with Retry-After (default 256)")
    parser.add_argument("--max-tokens-limit", type=_positive("--max-tokens-limit"), default=512,
                        help="largest max_tokens a request may ask for, and the default (default 512)")
    parser.add_argument("--max-model-len", type=_positive("--max-model-len"), default=None,
                        help="cap the context length (default: the model's)")
    parser.add_argument("--max-body-bytes", type=_positive("--max-body-bytes"), default=1 << 20,
                        help="largest request body; beyond, 413 (default 1 MiB)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--encoder", default=None, help="profile encoder (hub id or folder) instead of the one the "
                        "adapter's training record names")
    parser.add_argument("--prompt-style", default="auto", choices=["auto", "wvb", "preference"],
                        help="system prompt and profile prefix of chat requests (default: the adapter's training data)")
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/* (also read from "
                        "CUMA_API_KEY)")
    parser.add_argument("--threads", type=_positive("--threads"), default=None,
                        help="torch intra-op threads (default: the CPU cores this process may use)")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="on SIGTERM / Ctrl-C: seconds the requests in flight may take to finish (new ones get 503 "
                        "with Retry-After meanwhile); the rest then end with an error event and [DONE]; a second "
                        "signal stops at once (default 30)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--access-log", action="store_true", help="log every request")


def _is_loopback(host: str) -> bool:
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


STEP_DELAY_ENV = "CUMA_TEST_STEP_DELAY"  # test hook: seconds each decode step sleeps (keeps streams in flight)


def _test_step_delay():
    text = os.environ.get(STEP_DELAY_ENV)
    if not text:
        return None
    import time

    delay = float(text)
    return lambda rows: time.sleep(delay)


def draining_server(config, engine, drain_timeout: float):
    """A uvicorn server that shuts down gracefully on SIGTERM / SIGINT: the engine stops taking requests (503 with
    Retry-After), the rows in flight get ``drain_timeout`` seconds to finish, the rest end with an error event (a
    stream: then ``[DONE]``), and only then does uvicorn close its connections. The signal is handled, not re-raised,
    so the process exits 0; a second signal skips the wait."""
    import signal
    import threading

    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_thread: Optional[threading.Thread] = None

        def handle_exit(self, sig, frame) -> None:
            if self.drain_thread is not None:  # asked twice: stop now
                print("cuma serve: stopping now", file=sys.stderr, flush=True)
                engine.stop(timeout=0.5)
                self.should_exit = True
                self.force_exit = True
                return
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            running = engine.stats()
            print(f"cuma serve: {name}: shutting down; new requests get 503; waiting up to {drain_timeout:g} s for "
                  f"{running['running']} running and {running['waiting']} waiting rows", file=sys.stderr, flush=True)
            engine.begin_drain()
            self.drain_thread = threading.Thread(target=self._drain, name="cuma-serve-drain", daemon=True)
            self.drain_thread.start()

        def _drain(self) -> None:
            finished = engine.wait_idle(drain_timeout)
            left = engine.stats()
            engine.stop()  # what is left gets an error event ("the server is shutting down")
            if not finished:
                print(f"cuma serve: drain timeout: ended {left['running']} running and {left['waiting']} waiting rows "
                      "with an error", file=sys.stderr, flush=True)
            self.should_exit = True

    return DrainingServer(config)


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from .app import create_app
    from .engine import Engine
    from .served import ServedModel
    from .serving import Limits

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not args.drain_timeout >= 0:
        raise ValueError(f"--drain-timeout must be >= 0 seconds, got {args.drain_timeout}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    limits = Limits(max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes)
    api_key = args.api_key or os.environ.get("CUMA_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        print(f"cuma serve: warning: binding {args.host} without an API key; anyone who can reach it can use it",
              file=sys.stderr)

    served = ServedModel.load(
        args.model, args.adapter, args.method, served_name=args.served_name, device=args.device, dtype=args.dtype,
        encoder=args.encoder, max_model_len=args.max_model_len, prompt_style=args.prompt_style,
    )
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, cores))
    engine = Engine(served, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                    max_queue=args.max_queue, decode_hook=_test_step_delay()).start()
    app = create_app(served, engine, api_key=api_key, limits=limits)
    info = served.info
    print(f"cuma serve: {served.name!r} = {info['method']} on {info['base_model']} ({info['device']}, "
          f"{torch.get_num_threads()} threads, context {info['context_length']}, profile "
          f"{'required' if info['uses_profile'] else 'in the prompt' if info['profile_in_prompt'] else 'ignored'}); "
          f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=5, lifespan="off")
    server = draining_server(config, engine, args.drain_timeout)
    try:
        server.run()
    finally:
        engine.stop()
    print("cuma serve: stopped", file=sys.stderr, flush=True)
    return 0
