"""`python -m effitrans.bench <name> [args...]`: imports effitrans.bench.<name> and calls main(argv).

Subcommands are the modules of this package (attention, train, ...); each defines main(argv).
"""

import importlib
import pkgutil
import re
import sys

import effitrans.bench

# Every module of this package except the shared helpers is a subcommand.
KNOWN = tuple(
    sorted(m.name for m in pkgutil.iter_modules(effitrans.bench.__path__) if m.name not in ("common", "__main__"))
)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"usage: python -m effitrans.bench {{{','.join(KNOWN)}}} [args...]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or name in ("common",):
        print(f"unknown benchmark {name!r}; known: {', '.join(KNOWN)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"effitrans.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"effitrans.bench.{name}":
            print(f"unknown benchmark {name!r}; known: {', '.join(KNOWN)}", file=sys.stderr)
            return 2
        raise
    if not hasattr(module, "main"):
        print(f"effitrans.bench.{name} has no main(argv); known: {', '.join(KNOWN)}", file=sys.stderr)
        return 2
    result = module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
