"""The original README's examples, unchanged, against the new server.

The two long examples call ray.init() and ray.shutdown() themselves, so each runs
as its own script (bench/seed_examples/, where the bench measures them too). Their
bare ray.init() joins the test session's Ray through RAY_ADDRESS, as it joins a
cluster's: a second Ray of their own would have to start within Ray's fixed 30 s,
which a loaded machine misses. test_cli's `pype demo` covers the embedded start.
"""

import ast
import re
from pathlib import Path

import pytest
import ray

import pype
from tests.processes import run_script

EXAMPLES = Path(__file__).resolve().parents[1] / "bench" / "seed_examples"
# What Ray prints for a fire-and-forget call that failed in the shard ("Unhandled error"):
# the seed's scripts never ray.get their pushes, so a refused one would show only so.
PYPE_ERRORS = re.compile(r"pype\.errors\.\w+|QueueFullError|QueueTimeoutError|ShardLostError")
SEED_README = Path(__file__).resolve().parents[2] / "shared" / "SEED-README.md"


def test_start_push_pull(ray_session):
    server = pype.Server.remote()
    server.push.remote(42, 'meaning_of_life')
    answer = server.pull.remote('meaning_of_life')
    assert ray.get(answer) == [42]
    server.shutdown()


# Only a net for a script that hangs: on an idle machine each takes seconds, but their
# tasks poll in busy loops at Ray's worker niceness (15), which two busy processes of
# niceness 0 slow some 15-fold (a whole chain took about 4 minutes so, and finished).
SCRIPT_LIMIT = 900


def run_seed_script(script):
    """run_script with the script's bare ray.init() joining the session's Ray."""
    return run_script(script, timeout=SCRIPT_LIMIT,
                      env={"RAY_ADDRESS": ray.get_runtime_context().gcs_address})


@pytest.mark.timeout(SCRIPT_LIMIT + 60)
def test_locking_mechanisms_example(ray_session):
    code, output = run_seed_script(EXAMPLES / "locking_mechanisms.py")
    assert code == 0, output
    assert not PYPE_ERRORS.search(output), output  # a refused fire-and-forget push shows up so
    # print_queue after each push shows the item just pushed, or nothing if f took it already
    shown = [ast.literal_eval(m) for m in re.findall(r"queue 'data' \(fifo, \d of 1 items\): (\[.*\])",
                                                     output)]
    assert len(shown) == 20, output
    pushed = [items[0] for items in shown if items]
    assert pushed == sorted(set(pushed)) and set(pushed) <= set(range(20))


@pytest.mark.timeout(SCRIPT_LIMIT + 60)
def test_data_communication_chains_example(ray_session):
    code, output = run_seed_script(EXAMPLES / "data_communication_chains.py")
    assert code == 0, output
    assert not PYPE_ERRORS.search(output), output
    # Each of the 6 stages and the driver's pull wrap the item in a list: the driver
    # prints "Received  [[[[[[[i]]]]]]]". Ray forwards the shards' print_queue lines into
    # the same stream, sometimes in the middle of a print, so match the nested item
    # itself (print_queue abbreviates its nesting to [[[[[[[...]]]]]]]).
    assert output.count("Received") == 100, output
    received = [int(i) for i in re.findall(r"\[{7}(\d+)\]{7}", output)]
    assert received == list(range(100)), output


@pytest.mark.skipif(not SEED_README.is_file(), reason="the seed README lies outside the repository")
@pytest.mark.parametrize("heading, script", [("Locking Mechanisms", "locking_mechanisms.py"),
                                             ("Data Communication Chains", "data_communication_chains.py")])
def test_example_scripts_are_the_seed_readme_code(heading, script):
    section = SEED_README.read_text().split(f"#### {heading}")[1]
    code = section.split("```python\n")[1].split("```")[0]
    ours = "\n".join(line for line in (EXAMPLES / script).read_text().splitlines()
                     if not line.startswith("# "))  # our header comments
    assert ours.strip() == code.strip()
