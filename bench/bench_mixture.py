"""A mixture's step costs what its dearest term's costs: all its terms read one policy forward and one reference
pass per pair (issue "Every objective the peers offer", item 5).

    .venv/bin/python bench/bench_mixture.py [--rounds 15] [--threads 2] [--out bench_out] [--tiny]

bench.py's 29.5M-parameter Llama and standard setting (prompts ~65, completions ~50 tokens), LoRA r8 on q/k/v/o,
fp32, one micro-batch of 8 training pairs with its reference log-probs computed once. A step here is what the
training step does per micro-batch: ``batch_logps`` (asking for what the objective needs), the objective's loss
and the backward; the optimizer update is the same for every objective and left out. The cases run interleaved,
one step each per round (dpo, bco_pair, sft, the mixture, ... then again), so a machine shared with other work
slows them alike; each round gives one ratio per pair of cases, and the median over rounds is reported. Beside
it, the objective's own share of a step (its loss and that loss's backward on fixed log-probs, median of 200):
what a mixture adds over one term, without the forward's noise. Prints and writes <out>/mixture.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import BATCH, LORA_TARGETS, SETTINGS, build_assets  # noqa: E402

MPO = "0.8*dpo+0.2*bco_pair+1*sft"
MODS = {"ld_alpha": 0.5, "use_weighting": True}
CASES = [("dpo", {}), ("bco_pair", {}), ("sft", {}), (MPO, {}), ("dpo", MODS), (MPO, MODS)]
PAIRS = [(MPO, "dpo", {}), (MPO, "bco_pair", {}), (MPO, "sft", {}), (MPO, "dpo", MODS)]  # mixture vs one term


def _label(name: str, mods: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in mods.items())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench_out")
    p.add_argument("--tiny", action="store_true", help="the tiny model: seconds, for development")
    args = p.parse_args(argv)
    import torch

    from preftune.core import objectives
    from preftune.core.config import Config
    from preftune.modeling.logprobs import batch_logps, cut_to_shared, make_batch, score_pairs
    from preftune.modeling.model import add_lora, load_model, load_tokenizer
    from preftune.training.prepare import prepare_data

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    assets = build_assets(out / "assets", args.tiny, BATCH)
    _, _, max_length, max_prompt = SETTINGS["standard"]
    data = Path(assets["data"])
    cfg = Config(model=assets["model"], data=str(data / f"train_standard_{BATCH}_v2.jsonl"),
                 eval_data=str(data / "heldout_standard_8_v2.jsonl"), lora_rank=8, lora_alpha=16.0,
                 lora_target_modules=LORA_TARGETS, max_length=max_length, max_prompt_length=max_prompt,
                 threads=args.threads, quiet=True, output=str(out / "unused")).validate()
    tok = load_tokenizer(cfg)
    pairs = prepare_data(cfg, tok).train[:BATCH]
    model = add_lora(load_model(cfg), cfg)
    batch = make_batch([q.prompt_ids for q in pairs], [q.chosen_ids for q in pairs], [q.rejected_ids for q in pairs],
                       tok.pad_token_id, True)
    with model.disable_adapter():
        ref, _, _ = score_pairs(model, pairs, pad_id=tok.pad_token_id, batch_size=BATCH)                   # (8, 2)
        ref_shared, _, _ = score_pairs(model, cut_to_shared(pairs), pad_id=tok.pad_token_id, batch_size=BATCH)
    model.train()

    def step(name: str, mods: dict) -> float:
        params = objectives.run_params(name, {}, modifiers=mods)
        t = time.perf_counter()
        s, c, *extra = batch_logps(model, batch, needs=objectives.needs(name, params))                     # (16,)
        more = {k: torch.stack([v[:BATCH], v[BATCH:]], 1) for k, v in (extra or [{}])[0].items()}
        if "shared" in more:
            more["ref_shared"] = ref_shared  # as the reference pass hands it (cached before training)
        lp = objectives.SeqLogps.of(torch.stack([s[:BATCH], s[BATCH:]], 1), torch.stack([c[:BATCH], c[BATCH:]], 1),
                                    ref, more=more)
        objectives.compute(name, lp, params).loss.mean().backward()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return dt

    def loss_only(name: str, mods: dict, n: int = 200) -> float:
        """The objective's share of a step: its loss and backward on fixed log-probs (leaves), median of n."""
        params = objectives.run_params(name, {}, modifiers=mods)
        s, c, *extra = batch_logps(model, batch, needs=objectives.needs(name, params))
        cols = {k: torch.stack([v[:BATCH], v[BATCH:]], 1).detach() for k, v in {"s": s, **(extra or [{}])[0]}.items()}
        counts = torch.stack([c[:BATCH], c[BATCH:]], 1)
        model.zero_grad(set_to_none=True)
        out = []
        for _ in range(n):
            logps = cols["s"].clone().requires_grad_()
            more = {k: v for k, v in cols.items() if k != "s"}
            if "shared" in more:
                more["ref_shared"] = ref_shared
            t = time.perf_counter()
            lp = objectives.SeqLogps.of(logps, counts, ref, more=more)
            objectives.compute(name, lp, params).loss.mean().backward()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    for name, mods in CASES:  # warm-up: allocations, first-call overheads
        step(name, mods)
    times: dict[str, list[float]] = {_label(*c): [] for c in CASES}
    t0 = time.time()
    for _ in range(args.rounds):
        for name, mods in CASES:
            times[_label(name, mods)].append(step(name, mods))
    losses = {_label(*c): loss_only(*c) for c in CASES}
    load = os.getloadavg()
    result = {"rounds": args.rounds, "threads": args.threads, "cpus": os.cpu_count(), "wall_s": time.time() - t0,
              "load_average_1_5_15": load, "torch": torch.__version__, "model_params": assets["params"],
              "step_s_median": {k: statistics.median(v) for k, v in times.items()}, "loss_only_s_median": losses,
              "pairs": []}
    print(f"{args.rounds} interleaved rounds, micro-batch {BATCH} pairs, {args.threads} threads on {os.cpu_count()} "
          f"cpus, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    for k, v in times.items():
        print(f"  {k:58s} {statistics.median(v):7.3f} s/step (median), of which loss + its backward "
              f"{losses[k] * 1e3:6.3f} ms")
    for mix, term, mods in PAIRS:
        ratios = [a / b for a, b in zip(times[_label(mix, mods)], times[_label(term, mods)])]
        row = {"mixture": _label(mix, mods), "term": _label(term, mods), "median_ratio": statistics.median(ratios),
               "quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3}
        result["pairs"].append(row)
        print(f"  {row['mixture']} / {row['term']}: {row['median_ratio']:.3f} (quartiles "
              f"{row['quartiles'][0]:.3f}-{row['quartiles'][2]:.3f})")
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixture.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
