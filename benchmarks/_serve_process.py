"""What the serving benchmarks share: their eight user profiles, the LoRA and CuMA adapters they compare, and a
`cuma serve` process on a free loopback port, started and waited for (GET /health) and stopped again."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

PROFILES = [
    {"country": "Egypt", "age_group": "25-34 years old", "gender": "Female", "religion": "Muslim"},
    {"country": "Sweden", "age_group": "55-64 years old", "gender": "Male", "religion": "None"},
    {"country": "Japan", "age_group": "35-44 years old", "gender": "Female", "religion": "Buddhist"},
    {"country": "Brazil", "age_group": "18-24 years old", "gender": "Male", "religion": "Roman Catholic"},
    {"country": "United States", "age_group": "45-54 years old", "gender": "Female", "religion": "Protestant"},
    {"country": "Nigeria", "age_group": "25-34 years old", "gender": "Male", "religion": "Muslim"},
    {"country": "India", "age_group": "65+ years old", "gender": "Female", "religion": "Hindu"},
    {"country": "Germany", "age_group": "18-24 years old", "gender": "Male", "religion": "None"},
]

# CuMA's fast router written out option by option rather than as conditioning="fast": the before/after runs build
# the same adapter with older source trees, which have no preset
FAST = {"router_input_norm": "balanced", "router_token_init_scale": 0.1, "router_profile_center": "train"}


def build_adapter(method: str, profile_rows):
    """An untrained-but-complete adapter of ``method`` ("lora" or "cuma", r=8 on q/v, random B, seed 0) on a fresh
    SmolLM2-135M; CuMA with the fast router, its profile centre fitted on ``profile_rows`` (the profiles' embeddings)."""
    import torch

    from cuma import methods, models
    from cuma.tuners.cuma.model import fit_profile_center

    base = models.load_base("smollm2-135m")
    torch.manual_seed(0)
    if method == "lora":
        return methods.build("lora", base, r=8, init_weights=False)
    built = methods.build("cuma", base, profile_dim=profile_rows.shape[1], init_weights=False, **FAST)
    fit_profile_center(built.model, profile_rows)
    return built


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``cuma serve --adapter ADAPTER`` (served name "bench") in a subprocess, its output in ``log``. ``src``: run
    the cuma package from that source folder instead (an older tree, for before/after runs); ``device`` is passed
    explicitly when given (the server's own default is cuda whenever one is present)."""

    def __init__(self, adapter: Path, log: Path, *, max_batch: int = 16, threads: Optional[int] = None,
                 device: Optional[str] = None, src: Optional[Path] = None, name: str = "server",
                 startup_timeout: float = 900.0) -> None:
        import httpx

        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "cuma.cli", "serve", "--adapter", str(adapter), "--served-name", "bench",
               "--port", str(self.port), "--max-batch-size", str(max_batch), "--max-queue", "512",
               "--log-level", "warning"]
        if device:
            cmd += ["--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if src is not None:
            env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{name} did not come up; see {log}")
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
