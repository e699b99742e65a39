"""Behavioural evaluation: what the policy writes, judged against what the reference writes on the same prompts.

At the end of a run (config ``gen_eval_prompts`` > 0 with a ``judge``) the policy and the reference (the same
model with its adapter disabled) each generate from the first N held-out prompts with one fixed seed, and
every policy completion is judged against the reference's:

    gen = behaviour_eval(model, tok, prompts, parse_judge("python:preftune.tinyworld:judge"),
                         n_prompts=32, max_new_tokens=32, temperature=0.0, seed=0, out_dir="runs/x")
    gen["win_rate"], gen["lc_win_rate"], gen["policy"]["mean_len"]

It returns the ``gen_eval`` dict of summary.json and writes ``gen_eval.jsonl`` (recomputed by ``summarize``);
their fields, and several judges: docs/behaviour.md, Behavioural evaluation of a run and Several judges.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..core.config import Config
from ..core.errors import InputError, one_line
from ..core.layout import GEN_EVAL
from ..data.rows import Content, PromptRow
from ..data.tokenize import Pair
from ..generation.judges import Judge, parse_judges
from .stats import agreement, lc_win_rate, wilson_interval


def win_rate(prefs: Sequence[float], level: float = 0.95) -> dict:
    """Win rate with ties counted one half, its Wilson interval, and the counts.

        win_rate([1, 1, 0.5, 0])   # {"win_rate": 0.625, "win_rate_ci": [...], "wins": 2, "ties": 1, "losses": 1, ...}
    """
    n = len(prefs)
    if n == 0:
        raise ValueError("win_rate of no judgements")
    wins, ties = sum(p == 1 for p in prefs), sum(p == 0.5 for p in prefs)
    k = float(sum(prefs))
    lo, hi = wilson_interval(k, n, level)
    return {"n": n, "win_rate": k / n, "win_rate_ci": [lo, hi], "wins": wins, "ties": ties,
            "losses": n - wins - ties, "tie_rate": ties / n}


def degeneration(texts: Sequence[str], n: int = 3) -> dict:
    """Repetition of whitespace words: the share of n-grams that repeat an earlier n-gram of the same completion
    (pooled over completions; 0 = no repetition), and corpus distinct-1/-2 (unique / total n-grams, Li et al. 2016).
    Empty inputs give 0 repetition and distinct 1."""
    words = [t.split() for t in texts]
    grams = {k: [[tuple(w[i:i + k]) for i in range(len(w) - k + 1)] for w in words] for k in (1, 2, n)}
    count = {k: sum(map(len, per_text)) for k, per_text in grams.items()}
    repeated = sum(len(g) - len(set(g)) for g in grams[n])  # n-grams seen earlier in the same completion
    distinct = {k: len(set().union(*grams[k])) / count[k] if count[k] else 1.0 for k in (1, 2)}
    return {f"repeated_{n}gram_share": repeated / count[n] if count[n] else 0.0, "distinct_1": distinct[1],
            "distinct_2": distinct[2]}


def summarize(rows: Sequence[dict], *, judge_spec: str | Sequence[str], max_new_tokens: int, temperature: float,
              seed: int) -> dict:
    """The ``gen_eval`` dict from gen_eval.jsonl rows (the test recomputes it from the file with this); with
    several judges laid out as the module docstring says, from each row's ``preference`` and ``judges``."""
    specs = [judge_spec] if isinstance(judge_spec, str) else list(judge_spec)
    sides = {}
    for side in ("policy", "reference"):
        sides[side] = {"mean_len": sum(r[f"{side}_tokens"] for r in rows) / len(rows),
                       "mean_chars": sum(len(r[side]) for r in rows) / len(rows),
                       "hit_max_share": sum(r[f"{side}_finish"] == "length" for r in rows) / len(rows),
                       **degeneration([r[side] for r in rows])}
    ref_len = sides["reference"]["mean_len"]
    first = judged(rows, rows)  # the rows' own keys are the first judge's verdicts
    position = {k: first.pop(k) for k in list(first) if k.startswith("position_")}
    out = {"judge": specs[0], "prompts": len(rows), "max_new_tokens": max_new_tokens, "temperature": temperature,
           "seed": seed, **first, "len_ratio": sides["policy"]["mean_len"] / ref_len if ref_len else None, **sides,
           **position}
    if len(specs) > 1:
        verdicts = {s: [r["judges"][s] for r in rows] for s in specs}
        out["judges"] = {s: judged(v, rows) for s, v in verdicts.items()}
        out["agreement"] = [{"a": s, "b": t, **agreement([v["preference"] for v in verdicts[s]],
                                                         [v["preference"] for v in verdicts[t]])}
                            for s, t in itertools.combinations(specs, 2)]
    return out


def judged(verdicts: Sequence[dict], rows: Sequence[dict]) -> dict:
    """One judge's numbers from its per-prompt verdicts: win rate, LC win rate, and its position bias when it
    asked both orders (the share of comparisons whose answer flipped with the order)."""
    prefs = [v["preference"] for v in verdicts]
    lc, se = lc_win_rate(prefs, [len(r["policy"]) for r in rows], [len(r["reference"]) for r in rows])
    flips = [f for v in verdicts if (f := v.get("position_flip")) is not None]
    position = {"position_bias": sum(flips) / len(flips), "position_flips": sum(flips),
                "position_compared": len(flips)} if flips else {}
    return {**win_rate(prefs), "lc_win_rate": lc, "lc_win_rate_se": se, **position}


def behaviour_eval(model: Any, tokenizer: Any, prompts: Sequence[PromptRow | Content], judge: Judge | Sequence[Judge],
                   *, n_prompts: int, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
                   out_dir: str | Path | None = None, batch_size: int = 8, reference_model: Any = None,
                   apply_chat_template: bool = False, prompt_ids: Sequence[list[int]] | None = None) -> dict:
    """Policy vs reference on the first ``n_prompts`` prompts; returns ``gen_eval`` and writes gen_eval.jsonl.

    The reference is ``reference_model`` when given, else the peft model with its adapter disabled. Lengths
    are generated tokens (mean_len) and characters (the LC regression, as AlpacaEval measures them).
    """
    from ..core.files import write_jsonl
    from ..generation.sampler import as_rows, generate
    from ..modeling.model import is_peft

    judges = [judge] if isinstance(judge, Judge) else list(judge)
    Config(judge=[j.spec for j in judges]).check_judges()  # each judge's numbers go under its own name
    rows_in = as_rows(prompts)[:n_prompts]
    ids = list(prompt_ids)[:n_prompts] if prompt_ids is not None else None
    if not rows_in:
        raise InputError("no prompts for the behavioural evaluation", field="gen_eval_prompts")
    if reference_model is None and not is_peft(model):
        raise InputError("behavioural evaluation needs a reference: a LoRA run (its adapter disabled) or a "
                         "reference model", field="gen_eval_prompts")
    kw = dict(num_samples=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
              batch_size=batch_size, apply_chat_template=apply_chat_template, prompt_ids=ids)
    policy = generate(model, tokenizer, rows_in, **kw)
    with model.disable_adapter() if reference_model is None else contextlib.nullcontext():
        reference = generate(reference_model if reference_model is not None else model, tokenizer, rows_in, **kw)
    pol = [r["completions"][0] for r in policy]
    ref = [r["completions"][0] for r in reference]
    verdicts = {j.spec: _verdicts(j, [r.prompt for r in rows_in], pol, ref) for j in judges}
    rows = [{"id": r.id, "prompt": r.prompt, "policy": pol[i], "reference": ref[i],
             "policy_tokens": p["completion_tokens"][0], "reference_tokens": q["completion_tokens"][0],
             "policy_finish": p["finish_reasons"][0], "reference_finish": q["finish_reasons"][0],
             **verdicts[judges[0].spec][i],
             **({"judges": {s: v[i] for s, v in verdicts.items()}} if len(judges) > 1 else {})}
            for i, (r, p, q) in enumerate(zip(rows_in, policy, reference))]
    result = summarize(rows, judge_spec=list(verdicts), max_new_tokens=max_new_tokens, temperature=temperature,
                       seed=seed)
    if out_dir is not None:
        write_jsonl(Path(out_dir) / GEN_EVAL, rows)
    return result


def _verdicts(judge: Judge, prompts: list[Content], policy: list[str], reference: list[str]) -> list[dict]:
    """One judge's verdict per prompt (preference, scores, position flip), or one line naming the judge."""
    try:
        prefs, sp, sr = judge.prefer(prompts, policy, reference)  # scores None from a pairwise judge
        flips = judge.position_flips(prompts, policy, reference)
    except InputError as e:
        if judge.spec and judge.spec in str(e):
            raise
        raise InputError(f"judge {judge.spec}: {e.message}", path=e.path, line=e.line, field="judge") from None
    except Exception as e:  # a user's judge can raise anything: the cell fails, naming it
        raise InputError(f"judge {judge.spec}: {type(e).__name__}: {one_line(e)}", field="judge") from None
    return [{"policy_score": sp[i] if sp else None, "reference_score": sr[i] if sr else None, "preference": p,
             **({"position_flip": flips[i]} if flips is not None else {})} for i, p in enumerate(prefs)]


def check_gen_eval(cfg: Config) -> list[Judge] | None:
    """The judges of a validated config, parsed before a run writes anything; None when the behavioural
    evaluation is off (``gen_eval_prompts`` 0 or no judge)."""
    if cfg.gen_eval_prompts == 0 or not cfg.judge:
        return None
    return parse_judges(cfg.judges(), cfg)


def run_gen_eval(cfg: Config, model: Any, tokenizer: Any, pairs: Sequence[Pair], out: str | Path,
                 judge: Judge | Sequence[Judge], reference_model: Any = None) -> dict:
    """``behaviour_eval`` on the first ``cfg.gen_eval_prompts`` distinct prompts of the tokenized held-out pairs.

    Prompts go in as the ids training scored, so chat templates and truncation match the log-prob yardsticks.
    The reference is ``reference_model`` (iterate's original model), else the adapter disabled; full fine-tuning
    (no adapter to disable) loads the base model again.
    """
    from ..modeling.model import is_peft, load_model

    seen: set[str] = set()
    rows, ids = [], []
    for p in pairs:
        if p.prompt not in seen and len(rows) < cfg.gen_eval_prompts:
            seen.add(p.prompt)
            rows.append(PromptRow(p.id, p.prompt, p.id.rpartition(":")[0], 0))
            ids.append(p.prompt_ids)
    reference = reference_model if reference_model is not None or is_peft(model) else load_model(cfg)
    return behaviour_eval(model, tokenizer, rows, judge, n_prompts=len(rows), max_new_tokens=cfg.gen_max_new_tokens,
                          temperature=cfg.gen_temperature, seed=cfg.seed, out_dir=out, batch_size=cfg.eval_batch_size,
                          reference_model=reference, prompt_ids=ids)
