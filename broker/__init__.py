"""The hub-side tunnel broker.

Node agents connect *out* to the broker over SSH; the broker owns one hub-side
listener per session, publishes the session's route to configurable-http-proxy and
answers the hub plugin over a small authenticated REST API.
"""

__version__ = "0.1.0"
