"""sdengine runtime: everything needed to turn a request into pixels.

Nothing happens at import time: no device probing, no model loading, no global state.
"""

__version__ = "0.1.0"
