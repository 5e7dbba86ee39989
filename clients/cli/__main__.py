"""`python -m clients.cli ...`: the `lego` command."""

from clients.cli.commands import main

main()
