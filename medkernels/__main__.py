"""``python -m medkernels info``: versions, backends and build facts."""
import sys

from .info import format_info, info


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["info"]):
        sys.stderr.write("usage: python -m medkernels info\n")
        return 2
    sys.stdout.write(format_info(info()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
