"""`python -m cpdfx ...` runs the CLI as the `cpdfx` script does (`main` is the
script's entry point); torchrun needs a module or a file to start: `torchrun
--nproc_per_node 2 -m cpdfx compress ...`."""
import sys


def main() -> int:
    """The command line. Its module, which loads torch, is imported here and not
    above: Ctrl-C during those seconds then exits 130 with one line, as it does
    once the CLI runs, and not with a traceback."""
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        print("cpdfx: interrupted", file=sys.stderr)
        return 130
    return cli()


if __name__ == "__main__":
    sys.exit(main())
