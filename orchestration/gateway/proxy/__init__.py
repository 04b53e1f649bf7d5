"""The gateway's reverse proxy: declared routes and upstreams (`config.py`), compiled for the request
path (`routing.py`), load balancing (`balancers.py`) and the ASGI app forwarding requests (`app.py`)."""
