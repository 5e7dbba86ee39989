"""`python -m actors ...`: one actor process (what the node agent spawns)."""

from actors.runtime import main

main()
