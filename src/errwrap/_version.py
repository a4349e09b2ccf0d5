"""The version of errwrap, in a module of its own so that any module can import it at the top
without importing the package (``from . import __version__`` inside ``errwrap.hub`` or
``errwrap.cli`` would make a cycle with ``errwrap/__init__.py``)."""

__all__ = ["__version__"]

__version__ = "0.1.0"
