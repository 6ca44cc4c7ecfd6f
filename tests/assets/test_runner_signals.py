"""`eocausal run` stays killable: Dagster's in-process execution maps SIGTERM to SIGINT's handler,
which a background job (SIGINT ignored) turns into an ignored SIGTERM; the runner restores it."""

import subprocess
import sys

CODE = """
import signal
from dagster._utils.interrupts import capture_interrupts
from assets.runner import keeping_sigterm

signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a shell starts the run with SIGTERM at its default,
signal.signal(signal.SIGINT, signal.SIG_IGN)   # SIGINT ignored, as in `nohup eocausal run ... &`
with keeping_sigterm():
    with capture_interrupts():  # what execute_in_process enters
        pass
    inside = signal.getsignal(signal.SIGTERM)
print(inside is signal.SIG_IGN, signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_sigterm_keeps_its_default_after_in_process_runs_in_a_background_job():
    # The child sets SIGTERM's starting disposition itself: it would otherwise inherit this
    # process's, which an earlier in-process run under a background pytest leaves ignored.
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    # Dagster did ignore SIGTERM inside; the runner gave it back its default.
    assert out.stdout.split() == ["True", "True"]
