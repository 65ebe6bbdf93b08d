"""Runs the test suite (``make test``): ``python -m pytest tests -q``, or pytest with the arguments
given.

OneFlow 0.9.0 itself can kill a process that has run many ``nn.Graph`` objects (SIGSEGV in
``vm::LazyJobStreamPolicy::DequeueNNGraph`` on an actor thread; README, "Known limits"): seen about
once in tens of suite runs, on tests whose own code had nothing to do with it (a graph kept alive,
CPU only). Such a crash takes the whole pytest process with it, so a run that ends by a signal is
run once more, after a notice that names the signal; the second run's result is the result. A
test that fails (an assertion, an error) fails the run at once, and a crash that comes back fails
it too.

    python -m tests.run_suite [pytest arguments]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pytest(args: list[str]) -> int:
    """pytest's exit status; a negative one is the signal that ended it."""
    return subprocess.run([sys.executable, "-m", "pytest", *(args or ["tests", "-q"])], cwd=ROOT).returncode


def signal_name(status: int) -> str:
    try:
        return signal.Signals(-status).name
    except ValueError:
        return f"signal {-status}"


def main(args: list[str]) -> int:
    status = run_pytest(args)
    if status >= 0:
        return status
    print(f"\nrun_suite: pytest was ended by {signal_name(status)} (OneFlow 0.9.0's nn.Graph crash, README "
          "'Known limits', if the trace above is in OneFlow's actor thread); running the suite once more",
          flush=True)
    status = run_pytest(args)
    if status < 0:
        print(f"\nrun_suite: the second run was ended by {signal_name(status)} too", flush=True)
        return 128 - status
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
