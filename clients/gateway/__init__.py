"""The HTTP gateway: an OpenAI-compatible images API, a native runs API, Prometheus
metrics and the web admin console, in front of the broker.

It is a client of the broker like any other (`clients.aio.AsyncClient`); it runs in
its own process (`lego gateway`, `python -m clients.gateway`) and owns one aiohttp
server and the client's one DEALER to the broker's frontend.
"""
