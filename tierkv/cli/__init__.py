"""The `tierkv` command: the application on top of the library (machine report, demo, replay, top).

Its workloads and benchmark scenarios live here, apart from the library core, because they are
what the command runs, not what an engine needs.
"""

from .main import main

__all__ = ["main"]
