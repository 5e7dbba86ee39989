"""`python -m clients.gateway`: see clients/gateway/server.py."""

from clients.gateway.server import main

if __name__ == "__main__":
    main()
