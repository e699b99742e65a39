"""``preftune iterate``: on-policy rounds of generate, judge, pair, train, evaluate.

    preftune iterate --model M --prompts prompts.jsonl --eval-data heldout.jsonl --judge SPEC --rounds 3 \\
        --num-samples 4 --objective dpo --output iter/
"""

from __future__ import annotations

import argparse

from .options import Command, add_config_flags, config_from

# iterate sets these itself (its --judge and --gen-eval-prompts, each round's data and resume).
ITERATE_SKIP = ("judge", "gen_eval_prompts", "gen_max_new_tokens", "gen_temperature", "data", "data_split",
                "eval_fraction", "resume", "init_adapter")


def _arguments(p: argparse.ArgumentParser) -> None:
    from ..generation.pairs import PAIR_RULES
    from ..training.rounds import REFERENCES

    p.add_argument("--prompts", required=True, help="training prompts: any data file with a `prompt` field")
    p.add_argument("--prompts-split", default="train", help="split of --prompts for a datasets source")
    p.add_argument("--judge", required=True, action="append", help="reward-model:PATH | python:module:function | "
                   "openai:MODEL@URL; repeat for several: the first ranks the samples, every one judges behaviour")
    p.add_argument("--rounds", type=int, default=3, help="rounds of generate, judge, pair, train (default 3)")
    p.add_argument("--num-samples", type=int, default=4, help="samples per prompt per round (default 4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens per sample (default 64)")
    p.add_argument("--pair-rule", default="max_min", choices=list(PAIR_RULES),
                   help="chosen/rejected from the scores: max_min (default), max_random, best_vs_second")
    p.add_argument("--min-gap", type=float, default=0.0, help="drop prompts whose chosen-rejected score gap is below")
    p.add_argument("--reference", default="initial", choices=list(REFERENCES),
                   help="initial (default: the starting model, OpenRLHF) or round (each round's start, RLHFlow)")
    p.add_argument("--gen-eval-prompts", type=int, default=64,
                   help="held-out prompts judged against the original reference each round (default 64)")
    add_config_flags(p, skip=ITERATE_SKIP)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from(args, skip=ITERATE_SKIP)
    from ..training.rounds import iterate

    specs = args.judge[0] if len(args.judge) == 1 else args.judge
    result = iterate(cfg, prompts=args.prompts, judge_spec=specs, rounds=args.rounds,
                     num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, pair_rule=args.pair_rule, min_gap=args.min_gap,
                     reference=args.reference, gen_eval_prompts=args.gen_eval_prompts, prompts_split=args.prompts_split)
    for r in result["rounds"]:
        print(f"round {r['round']}: {r['pairs']} pairs (judge {r['chosen_score']:.3g} vs {r['rejected_score']:.3g}); "
              f"held-out accuracy {r['eval_accuracy']:.3f}; win rate {r['win_rate']:.3f} (LC {r['lc_win_rate']:.3f}) "
              f"against the original reference")
    print(f"rounds in {cfg.output}; preftune decide {cfg.output} says whether they helped")
    return 0


ITERATE = Command("iterate", "on-policy rounds: generate, judge, pair, train, evaluate; decide says whether a round "
                  "helped", _arguments, _run, computes=True)
