"""`tierkv info`: what this machine offers tierkv, as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from .machine import MachineInfo, collect
from .text import format_bytes, table


def run_info(as_json: bool) -> int:
    info = collect()
    print(json.dumps(info.to_dict(), indent=2) if as_json else format_info(info))
    return 0


def _yes_no(available: bool) -> str:
    return "yes" if available else "no"


def format_info(info: MachineInfo) -> str:
    gpus = [f"{g.index}: {g.name}, {format_bytes(g.memory_bytes)}, compute capability {g.compute_capability}"
            for g in info.gpus] or [info.no_gpu or "none visible to torch"]
    rows = [
        ("tierkv", __version__),
        ("python", f"{info.python} on {info.platform}, {info.cpu_count} CPUs"),
        ("torch", f"{info.torch_version} ({info.torch_build} build)"),
        ("GPUs", gpus[0]),
        *[("", g) for g in gpus[1:]],
        ("CUDA driver", f"{_yes_no(info.cuda_driver.available)}: {info.cuda_driver.detail}"),
        ("pinned memory", f"{_yes_no(info.pinned_memory.available)}: {info.pinned_memory.detail}"),
        ("kvikio / GDS", f"{_yes_no(info.kvikio.available)}: {info.kvikio.detail}"),
        ("CPU checksums", info.cpu_checksums.detail),
        ("device tier", info.device_tier),
        ("disk tier I/O", info.disk_io),
        ("copy backend", f"{info.transfer_paths['backend']} (NVRTC kernels + copy-engine DMA on CUDA, torch otherwise)"),
        *[(f"  {op}", ", ".join(f"{d}: {'/'.join(sorted(set(by_size.values())))}" for d, by_size in dirs.items()))
          for op, dirs in info.transfer_paths.items() if isinstance(dirs, dict)],
    ]
    lines = table(rows)
    lines.append("config in effect (defaults overridden by TIERKV_* variables):")
    if info.config is None:
        lines.append(f"  error: {info.config_error}")
    else:
        lines += ["  " + line for line in table([(k, _config_value(k, v)) for k, v in info.config.items()])]
    lines += [f"note: {w}" for w in info.config_warnings]
    return "\n".join(lines)


def _config_value(name: str, value: Any) -> str:
    if value is None:
        return "not set"
    if name.endswith("_bytes"):
        return f"{format_bytes(value)} ({value} bytes)"
    return str(value)
