"""How a command ends: its exit code, its one-line error, and the record of a background job.

Imported once the command line is parsed, so that ``python -m engine --help`` never compiles
it (the project runs with PYTHONDONTWRITEBYTECODE: every engine module is compiled at import).
"""

from __future__ import annotations

import argparse
import sys


def run_as_job(args: argparse.Namespace, debug: bool) -> int:
    """Run the parsed command and turn how it ended into an exit code (see
    :mod:`engine.cli`); a process started as a background job (:mod:`engine.jobs`) records in
    its job folder how it ended. A closed stdout is not the command's error: it propagates."""
    import contextlib

    from engine import jobs

    job = jobs.spawned_job()
    try:
        with job.attach() if job else contextlib.nullcontext(), _slot_of(job):
            code = _run_saying_why(args, debug)
            if job and job.folder.is_dir():  # a folder removed under the job is not made again
                job.complete(code)
            return code
    except jobs.JobStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise  # not an error of the command: its reader left (main)
    except (ValueError, OSError) as exc:  # expected: a message a person can act on
        if debug:
            raise
        _say(exc, expected=True)
        return 2
    except Exception as exc:  # unforeseen: still one line, and a way to see more
        if debug:
            raise
        _say(exc, expected=False)
        return 1


_SAID = "(said on stderr)"


def _run_saying_why(args: argparse.Namespace, debug: bool) -> int:
    """The command. Its error line is printed here, inside the job's ``attach``: a job's status
    says ``failed`` only once its last output line (what the pages show as the reason's
    source) is written. Seen on a loaded machine: a status read as failed before the line."""
    try:
        return args.func(args)
    except BrokenPipeError:
        raise
    except Exception as exc:
        if not debug:
            _say(exc, expected=isinstance(exc, ValueError | OSError))
        raise


def _say(exc: BaseException, expected: bool) -> None:
    """The one line of an error, once (the note marks it said)."""
    if _SAID in getattr(exc, "__notes__", ()):
        return
    if expected:
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    else:
        print(f"error: unexpected {exc.__class__.__name__}: {one_line(exc)} (run with --debug "
              "for the traceback)", file=sys.stderr, flush=True)
    exc.add_note(_SAID)


def _slot_of(job):
    """A spawned job that computes holds the slot its starter took for it until the process
    ends (:mod:`engine.slots`); giving it back starts the next queued job."""
    if job is None:
        import contextlib

        return contextlib.nullcontext()
    from engine.budget import holding
    from engine.slots import store_root_of

    return holding(store_root_of(job.folder), job.folder, adopt_only=True)


def one_line(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(text.split())


