"""Methods of :class:`~aimss_dask.Stream` that operators provide.

``Stream.to_zarr`` is the streaming sink and ``Stream.batches`` the loader;
the core ``Stream`` type must not import them (operators build on the core,
not the other way round). So ``Stream`` declares them as :class:`Extension`
slots and each operator module fills its slot when it is imported, which
``import aimss_dask`` does for every operator.

Examples
--------
>>> class Thing:
...     shout = Extension("shout", provider="an example module")
>>> register_extension("shout", lambda self, word: word.upper())
>>> Thing().shout("hi")
'HI'
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from aimss_dask.core.errors import NotRegisteredError

_registry: dict[str, Callable[..., Any]] = {}


def register_extension(name: str, func: Callable[..., Any]) -> None:
    """Provide ``Stream.<name>``: ``func(stream, *args, **kwargs)``."""
    _registry[name] = func


class Extension:
    """A method slot filled by :func:`register_extension`."""

    def __init__(self, name: str, *, provider: str) -> None:
        self.name = name
        self.attr = name  # the attribute it is bound to, for messages
        self.provider = provider
        self.__doc__ = f"Provided by {provider}; see its documentation."

    def __set_name__(self, owner: type, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        func = _registry.get(self.name)
        if func is None:
            raise NotRegisteredError(
                f"{type(obj).__name__}.{self.attr} is provided by {self.provider}, which "
                "this process has not imported: `import aimss_dask` imports every operator"
            )
        bound = functools.partial(func, obj)
        functools.update_wrapper(bound, func)
        return bound
