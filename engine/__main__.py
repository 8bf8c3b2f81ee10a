"""``python -m engine``: the command line (:mod:`engine.cli`)."""

from engine.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())
