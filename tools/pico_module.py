"""pico-llm.py (and the tools) as Python modules, and the tools' command-line parser.

The script's file name has a hyphen, so `import pico-llm` is impossible: it is loaded with
importlib instead. The tests (tests/conftest.py) and the tools share this one loader.
Nothing here imports torch: make_notebook.py and make_3seqs.py run without it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.util
import io
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

TOOLS_DIR = Path(__file__).resolve().parent
PICO_PATH = TOOLS_DIR.parent / "pico-llm.py"


def load_script(path: Path, name: str):
    """The Python file at `path` as the module `name`, loaded once per name. It is registered
    in sys.modules before it runs, because dataclasses look their module up by name."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]           # a failed load is not a loaded module
            raise
    return sys.modules[name]


def load_pico():
    """pico-llm.py as the module `pico_llm`."""
    return load_script(PICO_PATH, "pico_llm")


def tool_description(doc: str) -> str:
    """A tool's --help description: the first sentence of its docstring, on one line (a
    docstring's first line may end mid-sentence)."""
    text = " ".join(doc.split("\n\n")[0].split())
    sentence = re.match(r".+?[.?](?=\s|$)", text)
    return sentence.group(0) if sentence else text


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on an error; the tools, as pico-llm.py, print one
    line, named after the tool: prog="tools/benchmark.py" errs as "benchmark: error: ..."."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.endswith("expected one argument"):   # e.g. --flags --compile: a value that
            flag = message.split()[1].rstrip(":")       # looks like a flag is not taken as one
            message += f" (give it one; a value that begins with '-' is written {flag}=VALUE)"
        sys.stderr.write(f"{Path(self.prog).stem}: error: {message} (see --help)\n")
        raise SystemExit(2)


def pico_flags_checked(pico, build, flag: str):
    """build() (pico-llm's parse_args or config_from_command_line on flags a tool passes on
    from its option `flag`), with pico-llm's argparse error for an unknown or malformed flag,
    which would exit as "pico-llm: error", raised as pico-llm's UserError naming `flag`."""
    with contextlib.redirect_stderr(io.StringIO()) as printed:
        try:
            return build()
        except SystemExit as stop:
            if stop.code in (0, None):     # --help (printed) or --version: done
                raise
            said = printed.getvalue().strip().splitlines() or ["pico-llm: error: refused"]
            message = said[-1].removeprefix("pico-llm: error: ").removesuffix(" (see --help)")
    raise pico.UserError(f"{flag}: {message}; see python pico-llm.py --help")


def check_flags_left_alone(pico, extra: list[str], owned: list[str], flag: str, why: str) -> None:
    """Refuses `extra` (pico-llm flags a tool passes on from its option `flag`) where they
    give one of `owned`, the settings the tool makes itself (`why`), at any value: they would
    be overridden without a word, or make pico-llm run another command."""
    unset = object()     # argparse fills in defaults only where the namespace has no value
    given = argparse.Namespace(**{name: unset for name in owned})
    pico_flags_checked(pico, lambda: pico.build_arg_parser().parse_args(extra, given), flag)
    named = [f"--{name}" for name in owned if getattr(given, name) is not unset]
    if named:
        one = len(named) == 1
        raise pico.UserError(f"{flag}: {', '.join(named)} cannot be given here ({why}); "
                             f"drop {'it' if one else 'them'}")


def integer_between(text: str, minimum: int, maximum: int | None = None) -> int:
    """`text` as an integer from `minimum` to `maximum` (None: no limit), or argparse's error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"expected at most {maximum}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts and sizes: an integer of at least 1 (0 rounds has no median)."""
    return integer_between(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type for a number of steps left out: an integer of at least 0."""
    return integer_between(text, 0)


def seed_int(text: str) -> int:
    """argparse type for --seed: pico-llm's range, 0 to 2**32 - 1 (a CPU's generator keeps only a
    seed's low 32 bits)."""
    return integer_between(text, 0, 2**32 - 1)


def path_text(text: str) -> str:
    """argparse type for a path to write or read: not empty (Path('') is the current directory,
    where a tool would then write)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty; give a path")
    return text


def positive_float(text: str) -> float:
    """argparse type for durations and rates: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text}")
    return value


MAX_SECONDS = 10**6   # about 11 days: a longer budget is a typo (subprocess's wait overflows near 1e10)


def seconds_type(text: str) -> float:
    """argparse type for a time budget or limit: a number of seconds above 0, at most
    MAX_SECONDS (a step count made from 1e308 seconds would overflow)."""
    value = positive_float(text)
    if value > MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SECONDS} seconds (11 days), "
                                         f"got {text}")
    return value


# Writes the device refuses: no space, a quota, a file too large, a failing disk.
FULL_DEVICE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


class StoppedBySignal(SystemExit):
    """SIGTERM or SIGHUP as an exit (status 128 + the signal), so that a tool's temporary
    folders and child processes are cleaned up as they are on Ctrl-C (Python's default for
    them ends the process where it stands)."""


def stopped_by_signal(signal_number, frame):
    raise StoppedBySignal(128 + signal_number)


def run_tool(main, prog: str) -> int:
    """A tool's main() as its command line runs it, with pico-llm's answers when the output
    fails: standard output closed early (piped into head) stops it with a line and status 141,
    a full disk under a file it writes or under standard output is one line and status 2. The
    Python exit then finds standard output on /dev/null and does not try the write again.
    SIGTERM and SIGHUP, where their action is the default (not ignored under nohup), stop it as
    an exit, which cleans up as it goes; the handlers are put back as it returns. Ctrl-C
    cleans up the same way, and ends in a line, not a traceback, with status 130."""
    caught = [number for number in (signal.SIGTERM, getattr(signal, "SIGHUP", None))
              if number is not None and signal.getsignal(number) is signal.SIG_DFL]
    for number in caught:
        signal.signal(number, stopped_by_signal)
    try:
        return main()
    except StoppedBySignal:
        with contextlib.suppress(OSError):
            print(f"{prog}: stopped by a signal", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            print(f"{prog}: stopped by Ctrl-C", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        sys.stdout = open(os.devnull, "w")
        with contextlib.suppress(OSError):          # stderr may be the same closed pipe
            print(f"{prog}: stopped: the output was closed (piped into head?) before it "
                  "finished; send it to a file, or through tail", file=sys.stderr)
        return 128 + signal.SIGPIPE
    except OSError as error:
        if error.errno not in FULL_DEVICE_ERRORS:
            raise
        sys.stdout = open(os.devnull, "w")
        what = f"'{error.filename}'" if error.filename else "the output"
        print(f"{prog}: error: cannot write {what} ({error.strerror}); free some space, or send "
              "the output elsewhere", file=sys.stderr)
        return 2
    finally:
        for number in caught:          # a tool run in this process by a test: as it was
            signal.signal(number, signal.SIG_DFL)


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_text_atomically(path: Path, text: str) -> None:
    """`text` in a temporary file beside `path`, renamed over it: a failure leaves the old file,
    and readers never see half of the new one (pico-llm.py's atomic_write_bytes does the same;
    the tools that write text run without importing torch); a symbolic link is written through."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else path
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())   # mkstemp makes it private (0600)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def refuse_gpu_size_on_a_cpu(pico, device, small_flag: str, what: str) -> None:
    """A GPU-sized measurement refused on a CPU, where GPT-2 small's shape takes minutes a
    step: pico-llm's UserError (`device` as pico-llm resolved it), naming the small run."""
    if device.type == "cpu":
        raise pico.UserError(f"{what} is sized for a GPU (GPT-2 small takes minutes a step on "
                             f"a CPU); add {small_flag} to try its code paths here, or run it "
                             "where CUDA is")


def too_many_passes(pico, steps: int, text: str):
    """pico-llm's UserError for a --steps that would read `text` (the flag that names it, and
    its value) more often than pico-llm ever reads a training text (its --epochs limit)."""
    return pico.UserError(f"--steps {steps} would read the {text} more than {pico.MAX_EPOCHS} "
                          "times, as pico-llm never does; lower --steps or add text")
