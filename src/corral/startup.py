"""What the command line settles before it imports anything heavy: the launch pays only for
what it runs.

pydantic looks for plugins (an observability hook, `pydantic` entry points) when it builds its
first validator, and the module that looks imports `importlib.metadata` (and with it `email`,
`socket`, `zipfile`...): a third of pydantic's start-up cost, for a hook the command line never
uses. `no_pydantic_plugins()` gives pydantic the answer its own documented switch
(`PYDANTIC_DISABLE_PLUGINS=__all__`) gives, without that import. Only the CLI calls it: a program
that imports corral as a library keeps its plugins. Whoever sets PYDANTIC_DISABLE_PLUGINS
themselves (to keep some plugins) is left alone, as is a pydantic whose loader is already in.
"""

from __future__ import annotations

import os
import sys
import types

_LOADER = "pydantic.plugin._loader"


def no_pydantic_plugins() -> None:
    """Call before pydantic is imported: pydantic then builds its validators without plugins."""
    if _LOADER in sys.modules or "PYDANTIC_DISABLE_PLUGINS" in os.environ:
        return
    loader = types.ModuleType(_LOADER, "pydantic plugins disabled by corral's command line")
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules[_LOADER] = loader
