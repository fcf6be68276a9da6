"""Restricted unpickling: a pickle may only name globals from an explicit allow-list.

Pickles are programs; a hostile one runs code the moment ``pickle.load`` meets its ``GLOBAL`` or
``REDUCE`` opcodes. ``RestrictedUnpickler`` resolves every global through an allow-list of
``(module, name) -> object`` and raises ``UnsafePickleError`` for anything else *before* the object is
created, so nothing outside the list is imported or called. Used for FLAME ``.pkl`` files (numpy,
scipy.sparse, chumpy mapped to numpy) and PyTorch ``pytorch_model.bin`` checkpoints (tensor rebuild
functions mapped to numpy).
"""
from __future__ import annotations

import io
import pickle
from typing import Any, Callable, Mapping

from avi_jax.errors import UnsafePickleError


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only through ``allowed``.

    Args:
      file: a binary file object.
      allowed: ``{(module, qualname): object}``; the object is returned for that global.
      source: a name for error messages (usually the file path).
      persistent_load: optional handler of persistent ids (PyTorch storages).
    """

    def __init__(self, file: io.BufferedIOBase, allowed: Mapping[tuple[str, str], Any], *,
                 source: str = "<pickle>", persistent_load: Callable[[Any], Any] | None = None,
                 encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self._allowed = dict(allowed)
        self._source = source
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}'; only "
                f"{len(self._allowed)} array/container types are allowed in this file") from None


def restricted_load(file: io.BufferedIOBase, allowed: Mapping[tuple[str, str], Any], *,
                    source: str = "<pickle>", **kwargs: Any) -> Any:
    """Unpickle ``file`` admitting only the globals in ``allowed``; raises ``UnsafePickleError``."""
    try:
        return RestrictedUnpickler(file, allowed, source=source, **kwargs).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise UnsafePickleError(f"{source}: not a readable pickle of the expected kind: {e}") from e
