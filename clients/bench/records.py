"""What every benchmark record says about where and when it ran."""

from __future__ import annotations

import datetime
import platform

import psutil


def machine() -> str:
    """The host, its CPUs and memory, and the Python that ran the benchmark."""
    return (f"{platform.node()}: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 1024**3:.0f} GiB, "
            f"{platform.python_implementation()} {platform.python_version()}")


def utc_now() -> str:
    """A record's date: minutes, UTC."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
