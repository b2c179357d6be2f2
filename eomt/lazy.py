"""Package attributes imported on first use, so that importing a package stays cheap (the
evaluation tools import neither torch nor timm unless they need them)."""

from importlib import import_module


def lazy_getattr(package: str, names: dict[str, str]):
    """A module `__getattr__` for `package`: a name of `names` (name -> module holding it), or
    a submodule of the package, imported when first asked for."""

    def __getattr__(name: str):
        if name in names:
            return getattr(import_module(names[name]), name)
        try:
            return import_module(f"{package}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module '{package}' has no attribute '{name}'") from None

    return __getattr__
