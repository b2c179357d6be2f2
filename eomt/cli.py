"""What the command-line tools share: a user's mistake (a missing file, a bad option or
combination of options, a folder that cannot be written) ends in one line `error: ...` and exit
status 2, as argparse's own usage errors do; a bug keeps its traceback.

    parser = ToolParser(description=__doc__)
    ...
    if __name__ == "__main__":
        run_tool(main, parse_args)
"""

import argparse
import sys

# What the library raises for a user's mistake, its message naming the file or key: missing
# or unwritable files and folders (OSError), bad values, options and files (ValueError, with
# BadSampleError and ConfigError).
USER_ERRORS = (OSError, ValueError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (the lines of a multi-line message joined by '; ')."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


class ToolParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a missing or unknown option, a value out of its
    choices) are one line `error: ...`, exit status 2, like the tool's other user errors."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def run_tool(main, parse_args=None, argv=None, user_errors=USER_ERRORS):
    """`main(parse_args(argv))` (without `parse_args`: `main(argv)`, a main that parses), with
    the user errors among `user_errors` said in one line on stderr and exit status 2. Returns
    what `main` returns."""
    args = parse_args(argv) if parse_args is not None else argv
    try:
        return main(args)
    except user_errors as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from error
