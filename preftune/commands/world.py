"""``preftune demo``, ``world`` and ``objectives``: the main job on the built-in tiny world, the world alone, and the
objective registry.

    preftune demo --output demo_out
    preftune world runs/world --variant chosen_shorter
    preftune objectives
    preftune objectives --markdown > docs/objectives.md     # the docs page, generated from the registry
"""

from __future__ import annotations

import argparse
import inspect
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.objectives import Objective
from .options import Command


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="demo_out")
    p.add_argument("--quick", action="store_true", help="a smaller, faster demo")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, quick=args.quick)
    return 0


def _world_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the folder to build the world in (model/, train.jsonl, eval.jsonl)")
    p.add_argument("--variant", default="default", choices=["default", "chosen_shorter", "flipped"],
                   help="chosen_shorter: a length bias to find; flipped: labels reversed (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=256, help="training pairs (default: %(default)s)")
    p.add_argument("--n-eval", type=int, default=64, help="held-out pairs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="same seed, byte-identical world (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="model width (the demo uses 128)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the demo uses 4)")
    p.add_argument("--safety", type=float, default=0.0, metavar="SHARE",
                   help="a refusal class for a pipeline's gate: this share of pairs are `leak:` prompts whose right "
                        "answer is a refusal, plus safety.jsonl and benign.jsonl prompt files (the demo uses 0.15)")


def _world(args: argparse.Namespace) -> int:
    from ..core.errors import InputError
    from ..tinyworld import build_world

    if not 0 <= args.safety < 1:
        raise InputError(f"{args.safety} is not a share in [0, 1)", field="safety")

    w = build_world(args.output, variant=args.variant, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed,
                    hidden=args.hidden, layers=args.layers, safety=args.safety)
    print(f"model: {w.model_dir}\ntrain: {w.train_path}\nheld-out: {w.eval_path}")
    if w.safety_path:
        print(f"safety prompts: {w.safety_path}\nbenign prompts: {w.benign_path}")
    return 0


def _objectives_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--markdown", action="store_true", help="print docs/objectives.md (generated from the registry)")


def _objectives(args: argparse.Namespace) -> int:
    if args.markdown:
        print(objectives_markdown(), end="")
        return 0
    from ..core.objectives import MODIFIERS, REGISTRY

    width = max(len(name) for name in REGISTRY)
    for o in REGISTRY.values():
        ref = "needs a reference" if o.needs_reference else "no reference"
        role = ", the fallback" if o.fallback else ""
        print(f"{o.name:{width}s} {o.family}{role}, {ref}, {o.data}: {o.summary}")
        for key, p in o.params.items():
            default = "derived" if p.default is None else p.default
            print(f"    {key:18s} default {default!s:8s} {p.rule:12s} {p.help}")
        if o.modifiers:
            print(f"    takes {', '.join(m for m in MODIFIERS if m in o.modifiers)}")
    print("\nmodifiers (config keys, for the objectives that take them):")
    for m in MODIFIERS.values():
        print(f"    {' + '.join(m.fields):{width + 26}s} {m.summary}")
    print('\nmixtures: --objective "0.8*dpo + 0.2*bco_pair + 1*sft" (each term\'s hyperparameters from its own entry)')
    return 0


# What no single registry entry says; the rest of docs/objectives.md comes from the entries themselves.
ACROSS = """## Across objectives

- **`nll_weight`** (`--nll-weight W`, default 0, >= 0) adds W · (mean token NLL of chosen) to *any* objective,
  RPO-style, logged as `nll_loss`. No objective hides one: TRL's CPOTrainer with `loss_type="simpo"` keeps
  `cpo_alpha=1.0` and so adds it silently; preftune's `simpo` doesn't (`cpo_simpo` is that). ORPO already
  contains it.
- **Mixtures**: a weighted sum of objectives goes wherever an objective name goes, as TRL's `loss_type` list with
  `loss_weights`: `--objective "0.8*dpo + 0.2*bco_pair + 1*sft"` (MPO), `--grid objective=dpo,"0.5*dpo+1*sft"`,
  terms from your own modules too (`0.5*mymodule:slic + 1*sft`). Each term's hyperparameters come from its own
  `objectives:` entry (`--beta` fills every term that takes it); all terms read one policy forward and one
  reference pass, so a mixture costs what its dearest term costs ([bench](../bench/README.md)). It needs a
  reference if any term does; its terms must all be paired or all unpaired; weights are finite numbers >= 0.
  It logs each term's own loss as `loss/<name>` (TRL's `loss_type` name where there is one: `loss/sigmoid` for
  `dpo`; TRL itself logs only the total) beside the total `loss`; its rewards are its first preference term's.
- **Modifiers** (config keys, declared once in `preftune/core/objectives/modifiers.py`, applied to every
  objective that lists them under "takes"; any other gets a one-line error):
  `ld_alpha` (LD-DPO: each side's log-prob becomes shared + α·tail, the shared part being the first
  min(|c|, |r|) completion tokens, for policy and reference; computed in the same forward), `use_weighting`
  (WPO: each pair's loss times w_c·w_r, w = exp(mean token log p − log Σ_v p_v²) under the policy, no
  gradient), `f_divergence_type` (`reverse_kl` default, `forward_kl`, `js_divergence`, `alpha_divergence` with
  `f_alpha_divergence_coef`, default 0.5: how Δ scores each log-ratio). In a mixture every preference term must
  take a modifier that is on; likelihood terms (`sft`) are left as they are, except by WPO's weight, as in TRL.
  A matrix factor like any key: `--grid ld_alpha=0.3,0.7`.
- **SimPO's `gamma`** is TRL's `simpo_gamma` (absolute, reward units); `gamma_beta_ratio` is the paper's γ/β.
- **Reference passes.** Objectives that need no reference skip the reference pass over the training set. The
  held-out pairs' reference log-probs are computed for every objective (cheap, and cached), so both common
  yardsticks exist for every run ([decisions.md](decisions.md)).
- **Families** are what `decide` and `report` read, never the name: objectives are judged on the common
  yardsticks, and the `fallback` entry is what `decide` recommends when every judged objective is unstable.
- **Setting hyperparameters**: `objectives: {simpo: {beta: 2.5}}` in a config file, the shorthands `--beta`,
  `--gamma`, `--gamma-beta-ratio`, `--label-smoothing` for the objective being run, or a matrix factor such as
  `--grid beta=0.05,0.1` ([config.md](config.md)). Your own objective: [api.md](api.md).
"""


def _md(text: str) -> str:
    """A docstring as Markdown: reST's ``code`` and :role:`code` become `code`."""
    return re.sub(r":\w+:`([^`]+)`", r"`\1`", text.replace("``", "`"))


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|")


def _objective_section(o: Objective) -> list[str]:
    from ..core.objectives import MODIFIERS

    data = "paired (prompt/chosen/rejected rows)" if o.data == "paired" else \
        f"{o.data} (prompt/completion/label rows; pairs are unpaired for it)"
    facts = [f"family: {o.family}; reference model: {'needed' if o.needs_reference else 'not needed'}",
             f"data: {data}"]
    facts += ["the fallback: what `decide` recommends when every judged objective is unstable"] * o.fallback
    facts += [f"smallest batch size: {o.min_batch_size}"] * (o.min_batch_size > 1)
    facts += [f"give {' or '.join(f'`{k}`' for k in group)}, not both" for group in o.exclusive]
    facts += [f"takes the modifiers {', '.join(f'`{m}`' for m in MODIFIERS if m in o.modifiers)}"] * bool(o.modifiers)
    facts += [f"TRL: `DPOConfig(loss_type=\"{o.trl_loss_type}\")`; in a mixture its loss is logged as "
              f"`loss/{o.trl_loss_type}`"] * bool(o.trl_loss_type)
    if o.advice:
        facts.append(f"warns about its training data: {_md(inspect.getdoc(o.advice) or '')}")
    lines = [f"## `{o.name}`", "", _cell(o.summary), "", *[f"- {f}" for f in facts], ""]
    if o.params:
        lines += ["| hyperparameter | default | rule | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {'derived' if p.default is None else p.default} | {_cell(p.rule)} | {_cell(p.help)} |"
                  for k, p in o.params.items()]
        lines.append("")
    return [*lines, _md(inspect.getdoc(o.fn) or ""), ""]


def objectives_markdown() -> str:
    """docs/objectives.md: every registered objective, from its registry entry, schema and docstring."""
    from ..core.objectives import REGISTRY, registry

    notation = (registry.__doc__ or "").split("::\n\n", 1)[-1].split("\n\n", 1)[0]  # the docstring's notation block
    built_in = [o for o in REGISTRY.values() if o.spec == o.name]  # not the ones a user module registered
    lines = ["# Objectives", "",
             "Every built-in objective: its family, data, hyperparameters (defaults and rules) and the paper it comes",
             "from. Generated from the registry (`preftune/core/objectives/`): edit the registry, not this page, then",
             "run `preftune objectives --markdown > docs/objectives.md`.", "",
             "Notation, per pair:", "", "```text", inspect.cleandoc(notation), "```", "",
             "Mixtures (`0.8*dpo + 0.2*bco_pair + 1*sft`) and the modifiers (`ld_alpha`, `use_weighting`,",
             "`f_divergence_type`) are explained [at the end](#across-objectives).", "",
             "| objective | family | reference | data | hyperparameters (defaults) | TRL DPO loss_type | summary |",
             "|---|---|---|---|---|---|---|"]
    for o in built_in:
        params = ", ".join(f"`{k}`={'derived' if p.default is None else p.default}" for k, p in o.params.items())
        lines.append(f"| [`{o.name}`](#{o.name}) | {o.family} | {'needed' if o.needs_reference else 'free'} | "
                     f"{o.data} | {params or '—'} | {o.trl_loss_type or '—'} | {_cell(o.summary)} |")
    lines.append("")
    for o in built_in:
        lines += _objective_section(o)
    return "\n".join(lines) + "\n" + ACROSS


DEMO = Command("demo", "the main job on the built-in tiny world: SFT, 2x2 matrix, verdict, report", _demo_arguments,
               _demo, computes=True)
WORLD = Command("world", "build the built-in tiny model, tokenizer and preference task", _world_arguments, _world)
OBJECTIVES = Command("objectives", "list objectives, their hyperparameters and defaults", _objectives_arguments,
                     _objectives)
