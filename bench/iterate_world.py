"""Does an on-policy round help? The measured `preftune iterate` run of the README, on a larger tiny world.

    .venv/bin/python bench/iterate_world.py --out runs/iterate_world     # ~5 min on 2 CPU cores

It runs these preftune commands (printed as they run) and writes ``<out>/table.md``:

1. ``preftune world``: 2560 training pairs, 512 held-out, a random Llama of hidden 128 and 4 layers;
2. ``preftune train --objective sft --lora-rank 0``: 400 steps on the first 512 pairs only, so the model sorts
   partly (greedy judge score ~0.6 on the held-out prompts: room to improve, and samples that differ);
3. ``preftune iterate --rounds 2`` on the other 2048 prompts with DPO plus the chosen NLL (RPO), then
   ``preftune decide``; the same command with ``--rounds 3`` then adds a third round to the same folder, and
   ``preftune decide`` again;
4. the same two rounds with DPO alone (``--nll-weight 0``), for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

JUDGE = "python:preftune.tinyworld:judge"


def sh(args: list[str]) -> None:
    print("$ preftune " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "preftune.commands.cli", *args], check=True)


def table(folder: Path, decisions: dict[int, dict]) -> list[str]:
    rows = json.loads((folder / "summary.json").read_text())["rounds"]
    lines = ["| round | pairs (dropped) | judge: chosen / rejected | judge: policy / original, greedy | win rate [95% CI] "
             "| LC win rate ± SE | `decide` after this round |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gen = [json.loads(x) for x in (folder / r["folder"] / "gen_eval.jsonl").read_text().splitlines()]
        pol = sum(g["policy_score"] for g in gen) / len(gen)
        ref = sum(g["reference_score"] for g in gen) / len(gen)
        d = decisions.get(r["round"])
        verdict = "" if d is None else f"{d['verdict']} ({d['basis']['code']}, last beats first: {d['last_beats_first']})"
        lo, hi = r["win_rate_ci"]
        lines.append(f"| {r['round']} | {r['pairs']} ({sum(r['dropped'].values())}) | {r['chosen_score']:.3f} / "
                     f"{r['rejected_score']:.3f} | {pol:.3f} / {ref:.3f} | {r['win_rate']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['lc_win_rate']:.3f} ± {r['lc_win_rate_se']:.3f} | {verdict} |")
    return lines


def decide(folder: Path) -> dict:
    sh(["decide", str(folder)])
    return json.loads((folder / "decision.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/iterate_world")
    p.add_argument("--threads", default="1", help="torch threads (the README's numbers: 1)")
    a = p.parse_args()
    out = Path(a.out)
    world = out / "world"
    sh(["world", str(world), "--n-train", "2560", "--n-eval", "512", "--hidden", "128", "--layers", "4"])
    common = ["--eval-data", str(world / "eval.jsonl"), "--max-length", "64", "--eval-every", "0", "--save-every", "0",
              "--threads", a.threads, "--cache-dir", str(out / "cache"), "--quiet"]
    if not (out / "sft" / "summary.json").exists():
        sh(["train", "--model", str(world / "model"), "--data", str(world / "train.jsonl"), "--max-train-pairs", "512",
            "--objective", "sft", "--lora-rank", "0", "--lr", "3e-3", "--max-steps", "400", "--batch-size", "16",
            "--warmup-ratio", "0.05", "--seed", "0", "--output", str(out / "sft"), *common])
    prompts = out / "prompts.jsonl"  # the 2048 training prompts the SFT model never saw
    lines = (world / "train.jsonl").read_text().splitlines()[512:]
    prompts.write_text("\n".join(lines) + "\n")
    print(f"$ tail -n +513 {world / 'train.jsonl'} > {prompts}", flush=True)
    it = ["iterate", "--model", str(out / "sft" / "model"), "--prompts", str(prompts), "--judge", JUDGE,
          "--num-samples", "4", "--temperature", "1.0", "--max-new-tokens", "12", "--gen-eval-prompts", "512",
          "--objective", "dpo", "--lr", "2e-3", "--epochs", "2", "--batch-size", "8", "--warmup-ratio", "0",
          "--lora-rank", "8", "--seed", "42", *common]
    rpo, dpo = out / "iter", out / "iter-dpo"
    decisions = {}
    sh([*it, "--nll-weight", "1", "--rounds", "2", "--output", str(rpo)])
    decisions[2] = decide(rpo)
    sh([*it, "--nll-weight", "1", "--rounds", "3", "--output", str(rpo)])
    decisions[3] = decide(rpo)
    sh([*it, "--nll-weight", "0", "--rounds", "2", "--output", str(dpo)])
    dpo_decision = decide(dpo)
    text = ["DPO + NLL (`--nll-weight 1`):", "", *table(rpo, decisions), "", "DPO alone (`--nll-weight 0`):", "",
            *table(dpo, {2: dpo_decision})]
    (out / "table.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
