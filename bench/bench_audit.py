"""The model-free data audit on a large file: time and peak memory of ``preftune audit`` streaming 100k pairs.

    .venv/bin/python bench/bench_audit.py [--pairs 100000] [--out bench_out/audit]
    /usr/bin/time -v .venv/bin/python bench/bench_audit.py --pairs 100000     # the whole process, as the OS sees it

Writes a human/assistant-style file (plain strings with the prompt implicit, as public preference sets ship
them: about 1.4 kB a row, 90k distinct prompts with 1-2 pairs each, a few planted duplicates, swaps and
whitespace rows) and a 2k-pair held-out file with some training prompts in it, then runs the audit in this
process and prints the wall time, the CPU time, the peak RSS (``resource.getrusage``) and the RSS before the
audit (interpreter + imports), so the audit's own share is the difference. Target (issue 20): under a minute on
2 cores, with memory bounded by the distinct prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a of to and in is it you that for on with as are this be at or have from by not what can how do "
         "your will one all would there their about which when make like time just know take people into year "
         "good some could them see other than then now look only come its over think also back after use two").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make(path: Path, held: Path, pairs: int, seed: int = 0) -> None:
    """``pairs`` training rows and ``pairs // 50`` held-out rows; every 10th prompt has a second pair."""
    rng = random.Random(seed)
    prompts = [f"\n\nHuman: {_text(rng, 60)}?\n\nAssistant: {_text(rng, 40)}.\n\nHuman: and {i}?\n\nAssistant:"
               for i in range(int(pairs / 1.1) + 1)]
    with open(path, "w") as f:
        for i in range(pairs):
            p = prompts[i if i < len(prompts) else (i - len(prompts)) * 10]
            chosen, rejected = f" {_text(rng, rng.randint(20, 80))}.", f" {_text(rng, rng.randint(20, 120))}."
            row = {"chosen": p + chosen, "rejected": p + rejected}
            if i % 5000 == 1:
                row["chosen"] = p + " "                       # a whitespace completion
            f.write(json.dumps(row) + "\n")
            if i % 10000 == 3:
                f.write(json.dumps(row) + "\n")               # a duplicate
                f.write(json.dumps({"chosen": row["rejected"], "rejected": row["chosen"]}) + "\n")  # a swap
    with open(held, "w") as f:
        for j in range(pairs // 50):
            p = prompts[j * 7] if j % 20 == 0 else f"\n\nHuman: held {j} {_text(rng, 30)}?\n\nAssistant:"
            f.write(json.dumps({"chosen": p + " yes.", "rejected": p + " no, not at all."}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=100_000)
    ap.add_argument("--out", default="bench_out/audit")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = out / f"train-{args.pairs}.jsonl", out / f"held-{args.pairs}.jsonl"
    if not train.exists():
        make(train, held, args.pairs)
    from preftune.data.audit import audit_source, headline
    from preftune.data.rows import RowPolicy

    before = resource.getrusage(resource.RUSAGE_SELF)
    t0, c0 = time.perf_counter(), time.process_time()
    audit = audit_source(str(train), str(held), RowPolicy())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    size = train.stat().st_size / 2**20
    print(f"audit of {args.pairs:,} pairs ({size:.0f} MiB): {headline(audit)}")
    print(f"wall {wall:.1f} s, cpu {cpu:.1f} s ({args.pairs / wall:,.0f} pairs/s); peak RSS {peak:.0f} MiB, "
          f"{before.ru_maxrss / 1024:.0f} MiB before the audit (interpreter + imports)")
    (out / "result.json").write_text(json.dumps({"pairs": args.pairs, "file_mib": size, "wall_s": wall, "cpu_s": cpu,
                                                 "peak_rss_mib": peak, "rss_before_mib": before.ru_maxrss / 1024,
                                                 "counts": audit.counts}, indent=2))


if __name__ == "__main__":
    main()
