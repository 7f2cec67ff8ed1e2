"""A short, seeded libFuzzer run of ``fuzz_decode.py`` in a subprocess (``make fuzz`` runs longer).

The harness fails (non-zero exit, a crash file under ``tmp_path``) on any exception other than
``ImageError`` and on any pixel decode over the pixel limit; this test passes only when the run
completes with neither. libFuzzer's ``-seed`` fixes the mutation sequence, and the corpus starts
from the same seeds every time, so the run is reproducible.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fuzz.seeds import seed_images, write_corpus

HARNESS = Path(__file__).with_name("fuzz_decode.py")
RUNS = 1500


def test_short_fuzz_run_of_image_decoding_finds_no_crash_and_no_oversize_decode(tmp_path):
    corpus = tmp_path / "corpus"
    assert write_corpus(corpus) == len(seed_images())
    command = [sys.executable, str(HARNESS), f"-runs={RUNS}", "-seed=1", "-max_len=16384", "-timeout=20",
               "-rss_limit_mb=1536", "-max_total_time=60", f"-artifact_prefix={tmp_path}/", str(corpus)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env={**os.environ},
                            cwd=tmp_path)
    output = result.stdout + result.stderr
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "oom-", "timeout-", "leak-"))]
    assert result.returncode == 0 and not crashes, f"{crashes}\n{output[-6000:]}"
    done = re.search(r"Done (\d+) runs", output)
    assert done, output[-3000:]
    # -max_total_time only guards a starved machine; a normal run does all RUNS
    assert int(done.group(1)) >= RUNS // 5, output[-3000:]
    assert re.search(r"cov: \d+", output), "no coverage reported: is the harness instrumented?"
