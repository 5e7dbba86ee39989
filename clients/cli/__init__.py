"""The `lego` command line and the operator views it renders (status, top, admin)."""

from clients.cli.commands import main

__all__ = ["main"]
