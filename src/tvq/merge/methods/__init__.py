"""Built-in merge methods: every module here registers itself with ``@merge_method``.

Adding a method = adding one module to this package; it is imported (and so registered) here.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
