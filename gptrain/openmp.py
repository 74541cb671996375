"""OpenMP threads that sleep at once when they wait, so training holds up on a CPU shared with other work.

torch's CPU wheels run their thread pool on GNU OpenMP (libgomp). With OMP_WAIT_POLICY unset, a libgomp thread
that reaches a barrier first spins for ~300,000 iterations (about 3 ms) before it sleeps, and a training step
crosses thousands of barriers. On 2 cores with 2 threads that is harmless while nothing else runs; when one
other process wants a core, the spinning thread keeps its core busy doing nothing while the thread it waits for
shares the other one with that process, and every barrier costs time slices: the demo's step went from ~135 ms
to ~3,200 ms (24x) in the walkthrough of issue 23. With OMP_WAIT_POLICY=PASSIVE a waiting thread sleeps at once
and gives its core away (benchmarks/busy_cpu.py; figures in benchmarks/RESULTS.md, "A busy CPU"). The wait
policy changes no arithmetic: losses are the same bit for bit.

`gptrain serve` is the exception (`spin_briefly`): its decode step on 2 threads crosses ~100 barriers in 25 ms,
and sleeping and waking at each one made it 1.5x slower than spinning. It spins for SERVE_SPINCOUNT iterations
(~50-100 us) rather than libgomp's 300,000: about as fast on an idle machine, and a step that starts while another
process is busy does not stall for that process's time slices (a first token within 0.08-0.18 s where 300,000
spins sometimes took 1.2 s; benchmarks/serve_spin.py, figures in benchmarks/RESULTS.md, issue 22). While such a
process goes on, the server's scheduler decodes on one thread (gptrain/decode_threads.py).

libgomp reads its environment once, when torch loads it, so this must run before `import torch`: `gptrain`'s
package __init__ imports this module first and loads torch only when the model is first used; the `gptrain`
command calls `spin_briefly` for `serve` before it imports the command. A user's own OMP_WAIT_POLICY or
GOMP_SPINCOUNT is left alone, and nothing is set when torch is already loaded (the setting would be read by no one).
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "PASSIVE"
SERVE_SPINCOUNT = "5000"


def prefer_passive_waiting() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE for this process and its children; True when it was set here."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    return True


def spin_briefly() -> bool:
    """Replace the PASSIVE policy set here by a short spin (GOMP_SPINCOUNT=SERVE_SPINCOUNT) while torch has not
    loaded yet; True when replaced."""
    if "torch" in sys.modules or not _SET_HERE or os.environ.get("OMP_WAIT_POLICY") != WAIT_POLICY:
        return False
    del os.environ["OMP_WAIT_POLICY"]
    os.environ["GOMP_SPINCOUNT"] = SERVE_SPINCOUNT
    return True


_SET_HERE = prefer_passive_waiting()
