"""Few-shot methods, one file each, behind one contract (``base.py``) and one registry (``registry.py``); the
parts they share are in ``components/``, the base of the detectors that train on images in ``trained.py``.

``create(name, runtime=None, **params)`` builds any method; ``get(name)`` says what it is (family, input
kind); ``names(...)`` lists them; ``Method.load(folder)`` reloads any saved one.
"""

from fewshot_core.methods.registry import REGISTRY, MethodEntry, create, get, names

__all__ = ["REGISTRY", "MethodEntry", "create", "get", "names"]
