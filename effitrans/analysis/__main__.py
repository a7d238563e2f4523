"""`python -m effitrans.analysis <name> [args...]`; names: attention (effitrans.analysis.study)."""

import sys

COMMANDS = ("attention",)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown analysis {argv[0]!r}; known: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from effitrans.analysis import study

    return study.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
