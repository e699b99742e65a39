"""The training loop: one function, top to bottom, for every objective.

Runs differ only in their loss: tokenization, data order (a function of seed and epoch alone), optimizer,
schedule and evaluation are shared. Reference log-probs are computed once up front (and cached on disk);
reference-free objectives skip them for the training set.

    preftune train --model M --data train.jsonl --eval-data heldout.jsonl --objective dpo --beta 0.1 \\
        --lora-rank 8 --lr 5e-6 --batch-size 8 --max-steps 100 --output runs/x

    >>> import preftune
    >>> summary = preftune.train(preftune.Config(model="M", data="train.jsonl", objective="simpo"))
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from . import objectives, stats, trackers
from .behaviour import check_gen_eval, run_gen_eval
from .config import Config, dump_yaml
from .data import DataStats, Pair, batch_order, load_examples, split_by_prompt, tokenize_examples
from .errors import InputError, TrainingDiverged
from .evaluate import evaluate, summarize
from .files import (
    FolderLock,
    append_jsonl,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
    read_jsonl,
    write_jsonl,
)
from .logprobs import batch_logps, make_batch, prefix_sharing_blocker
from .model import add_lora, fingerprint, is_peft, load_model, load_tokenizer, resolve_dtype
from .progress import Progress, phase
from .reference import cache_key, reference_logps


@dataclass
class Prepared:
    """Tokenized train and held-out pairs; the ablation matrix builds this once and hands it to every cell."""

    tokenizer: object
    train: list[Pair]
    eval: list[Pair]
    stats: dict[str, DataStats]


def prepare_data(cfg: Config, tokenizer: object) -> Prepared:
    """Load, validate, split and tokenize. Raises InputError before anything is written."""
    examples = load_examples(cfg.data, cfg.data_split)
    if cfg.eval_data:
        heldout = load_examples(cfg.eval_data, cfg.eval_split)
    elif cfg.eval_fraction > 0:
        examples, heldout = split_by_prompt(examples, cfg.eval_fraction, cfg.split_seed)
    else:
        raise InputError("no held-out pairs: give --eval-data FILE or --eval-fraction > 0", field="eval_data")
    if cfg.max_train_pairs:
        examples = examples[:cfg.max_train_pairs]
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
              apply_chat_template=cfg.apply_chat_template)
    with phase("tokenize", total=len(examples) + len(heldout), quiet=cfg.quiet):
        train, train_stats = tokenize_examples(examples, tokenizer, source=cfg.data, **kw)
        held, held_stats = tokenize_examples(heldout, tokenizer, source=cfg.eval_data or cfg.data, **kw)
    return Prepared(tokenizer, train, held, {"train": train_stats, "eval": held_stats})


class Schedule:
    """Which training pairs each optimizer step sees: a function of (seed, epoch, lengths) alone, so every
    objective gets the same data order, a resumed run the same batches, and the reference pass knows in
    advance which pairs it must score."""

    def __init__(self, cfg: Config, pairs: list[Pair]) -> None:
        self.cfg, self.step_pairs = cfg, cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = math.ceil(len(pairs) / self.step_pairs)
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
        self.lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
        self._epoch: tuple[int, list[list[int]]] | None = None

    def batch(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, batch_order(self.lengths, self.step_pairs, seed=self.cfg.seed, epoch=epoch,
                                              group_by_length=self.cfg.group_by_length))
        return self._epoch[1][i]

    @functools.cached_property
    def visited(self) -> list[int]:
        """Indices of every training pair some step will use, sorted."""
        return sorted({i for step in range(self.total) for i in self.batch(step)})


def reference_requests(cfg: Config, data: Prepared, schedule: Schedule) -> dict[str, tuple[list[Pair], int]]:
    """The reference log-prob sets a run asks for, each with the batch size it is computed in.

    Held-out always (both yardsticks need it), in evaluation's own batch layout so that at step 0 policy and
    reference are bit-identical and every reference-relative margin is an exact tie. Training pairs only when
    the objective needs them, and only those the schedule visits. The ablation matrix warms the cache from
    this same list, so its keys are the ones each cell's run looks up.
    """
    sets = {"eval": (data.eval, cfg.eval_batch_size)}
    if objectives.get(cfg.objective).needs_reference:
        sets["train"] = ([data.train[i] for i in schedule.visited], max(32, cfg.eval_batch_size))
    return sets


def lr_at(step: int, cfg: Config, total: int) -> float:
    """transformers' schedules (linear/cosine/constant with linear warmup), so runs compare with TRL's."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if cfg.scheduler == "linear":
        return cfg.lr * max(0.0, 1.0 - progress)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr


def train(cfg: Config, *, prepared: Prepared | None = None, base_model: torch.nn.Module | None = None) -> dict:
    """Train one run and write its folder (see docs/formats.md). Returns the summary dict.

    ``prepared`` and ``base_model`` let the ablation matrix share tokenized data and the loaded base model
    across cells; a LoRA run leaves ``base_model`` as it found it.
    """
    cfg.validate()
    dtype = resolve_dtype(cfg)  # bf16 that the hardware would emulate stops here, before any loading
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output)
    check_writable_dir(out, field="output")  # a file as --output: one line, exit 2, the file untouched
    check_writable_dir(cfg.resolved_cache_dir(), field="cache_dir")
    report_to = trackers.check(cfg.report_to)  # a missing extra stops here, before the output folder is touched
    params = cfg.objective_params()
    checkpoint = latest_checkpoint(out) if cfg.resume else None
    if out.exists() and any(p.name != ".lock" for p in out.iterdir()) and not cfg.resume:
        raise InputError("output folder is not empty: pass --resume to continue it, or choose another --output",
                         path=str(out))
    if cfg.resume and (out / "summary.json").exists() and _status(out) == "finished":
        return json.loads((out / "summary.json").read_text())

    # 1. Everything that can reject the input happens before the output folder is touched.
    tok = prepared.tokenizer if prepared else load_tokenizer(cfg)
    data = prepared or prepare_data(cfg, tok)
    gen_judge = check_gen_eval(cfg)  # a bad judge spec fails here, before the output folder is touched
    model = base_model if base_model is not None else load_model(cfg)
    cache_dir = cfg.resolved_cache_dir()
    model_fp = fingerprint(cfg.model, cache_dir)
    torch.manual_seed(cfg.seed)  # LoRA init and dropout: same seed, same adapter at step 0 for every objective
    model = add_lora(model, cfg)
    pad_id = tok.pad_token_id
    blocker = prefix_sharing_blocker(model) if cfg.share_prompt else None
    share = cfg.share_prompt and blocker is None  # else the plain layout: same numbers, prompt run twice
    fast = dict(share_prompt=share, chunk=cfg.logit_chunk, autocast_bf16=cfg.autocast_bf16)
    lm = model.get_base_model() if is_peft(model) else model
    model_info = {"attn_implementation": lm.config._attn_implementation, "dtype": dtype,
                  "share_prompt": share, "share_prompt_blocker": blocker}

    with contextlib.ExitStack() as stack:
        if base_model is not None and is_peft(model):
            stack.callback(model.unload)  # hand the shared base model back without adapters, even on error
        if cfg.gradient_checkpointing:  # each layer keeps only its input and is recomputed in backward
            lm.activation_checkpointing_enable()
            stack.callback(lm.activation_checkpointing_disable)  # a shared base model goes back as it came
        stack.enter_context(FolderLock(out))
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        tracker = trackers.Trackers(report_to, cfg, out, resume_step=_checkpoint_step(checkpoint))
        stack.callback(tracker.close)
        timing = {"reference_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "train_pairs": 0, "train_tokens": 0,
                  "real_train_tokens": 0, "reference_tokens": 0, "eval_tokens": 0}

        # 2. Reference log-probs, once, before any update (which sets, and how: see reference_requests).
        schedule = Schedule(cfg, data.train)
        total, steps_per_epoch = schedule.total, schedule.steps_per_epoch
        t = time.perf_counter()
        refs, cached = {}, {"train": True, "eval": True}
        for name, (pairs, batch_size) in reference_requests(cfg, data, schedule).items():
            with phase(f"reference pass ({name})", total=len(pairs), quiet=cfg.quiet):
                refs[name], cached[name] = reference_logps(
                    model, pairs, key=cache_key(model_fp, pairs, dtype, cfg.autocast_bf16), cache_dir=cache_dir,
                    pad_id=pad_id, batch_size=batch_size, **fast)
            if not cached[name]:
                timing["reference_tokens"] += sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                                                  for p in pairs)
        ref_eval, ref_train = refs["eval"], None
        if "train" in refs:  # full-size, NaN where the schedule never goes
            ref_train = torch.full((len(data.train), 2), float("nan"))
            ref_train[schedule.visited] = refs["train"]
        timing["reference_s"] = time.perf_counter() - t
        timing["reference_cached"] = cached

        # 3. Optimizer; resume restores it with the RNG and the step.
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW([p for _, p in trainable], lr=cfg.lr, weight_decay=cfg.weight_decay)
        metrics_path = out / "metrics.jsonl"
        eval_kw = dict(pad_id=pad_id, batch_size=cfg.eval_batch_size, **fast)

        def run_eval(step: int) -> tuple[dict, list[dict]]:
            t = time.perf_counter()
            with phase(f"eval @ step {step}", total=len(data.eval), quiet=cfg.quiet):
                m, rows, processed = evaluate(model, data.eval, ref_eval, cfg.objective, params, **eval_kw)
            timing["eval_s"] += time.perf_counter() - t
            timing["eval_tokens"] += processed
            m = {"step": step, "epoch": step / steps_per_epoch, **m}
            append_jsonl(metrics_path, m)
            tracker.log(m)
            return m, rows

        start = 0
        if checkpoint is not None:
            start = load_checkpoint(checkpoint, trainable, opt)
            write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r["step"] <= start])
            last_eval = next((r for r in reversed(read_jsonl(metrics_path)) if "eval_loss" in r), None)
        else:
            metrics_path.unlink(missing_ok=True)
            step0, _ = run_eval(0)
        progress = Progress(total, quiet=cfg.quiet, name=f"{cfg.objective} r={cfg.lora_rank}", start=start)
        stack.callback(progress.close)
        if checkpoint is not None:  # not the step-0 line: it would read as a restart from scratch
            progress.resumed(start, checkpoint, last_eval)
        else:
            progress.eval(step0)

        # 4. The loop.
        model.train()
        for step in range(start, total):
            t = time.perf_counter()
            idx = schedule.batch(step)
            lr = lr_at(step, cfg, total)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            parts = []
            step_tokens = 0
            for j in range(0, len(idx), cfg.batch_size):
                mb = idx[j:j + cfg.batch_size]
                sub = [data.train[k] for k in mb]
                batch = make_batch([p.prompt_ids for p in sub], [p.chosen_ids for p in sub],
                                   [p.rejected_ids for p in sub], pad_id, share)
                s, c = batch_logps(model, batch, chunk=cfg.logit_chunk, autocast_bf16=cfg.autocast_bf16)  # (2k,)
                k = len(mb)
                ref = ref_train[mb].to(s.device) if ref_train is not None else None                      # (k, 2)
                lp = objectives.SeqLogps(chosen=s[:k], rejected=s[k:], chosen_tokens=c[:k], rejected_tokens=c[k:],
                                         ref_chosen=None if ref is None else ref[:, 0],
                                         ref_rejected=None if ref is None else ref[:, 1])
                res = objectives.compute(cfg.objective, lp, params)
                (res.loss.sum() / len(idx)).backward()  # mean over the step's pairs, however it is split
                parts.append((torch.stack([s[:k], s[k:]], 1).detach(), torch.stack([c[:k], c[k:]], 1), res))
                timing["train_tokens"] += batch.padded_tokens
                timing["real_train_tokens"] += batch.real_tokens
                step_tokens += batch.real_tokens
            clip = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")  # inf: measure, don't clip
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], clip)
            logps = torch.cat([p[0] for p in parts])
            counts = torch.cat([p[1] for p in parts])
            res = _cat_outputs([p[2] for p in parts])
            loss = res.loss.detach()
            if not (torch.isfinite(loss).all() and torch.isfinite(grad_norm)):
                return _diverged(out, cfg, step + 1, float(loss.mean()), float(grad_norm), timing, t_start,
                                 model_info)
            opt.step()
            dt = time.perf_counter() - t
            timing["train_s"] += dt
            timing["train_pairs"] += len(idx)
            row = {"step": step + 1, "epoch": (step + 1) / steps_per_epoch,
                   **summarize(logps, counts, res, loss), "grad_norm": float(grad_norm), "learning_rate": lr,
                   "pairs_per_second": len(idx) / dt, "tokens_per_second": step_tokens / dt}
            last = step + 1 == total
            if (step + 1) % cfg.log_every == 0 or last:
                append_jsonl(metrics_path, row)
                tracker.log(row)
            progress.step(step + 1, row)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not last:
                progress.eval(run_eval(step + 1)[0])
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
                save_checkpoint(out, step + 1, trainable, opt)

        # 5. Final eval, per-pair rows, weights, summary.
        final, rows = run_eval(total)
        progress.eval(final)
        write_jsonl(out / "eval_pairs.jsonl", rows)
        save_weights(out, model, tok)
        # behaviour: a judge failure raises before summary.json exists, so a matrix records this cell as failed
        gen_eval = run_gen_eval(cfg, model, tok, data.eval, out, gen_judge) if gen_judge else None
        summary = _summary(cfg, out, total, "finished", data, timing, t_start, model_info)
        if gen_eval is not None:
            summary["gen_eval"] = gen_eval
            atomic_write_json(out / "summary.json", summary)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # finished: optimizer state is dead weight
        progress.done(summary, out)
        return summary


def _cat_outputs(outs: list[objectives.Output]) -> objectives.Output:
    return objectives.Output(
        loss=torch.cat([o.loss for o in outs]),
        chosen_rewards=torch.cat([o.chosen_rewards for o in outs]),
        rejected_rewards=torch.cat([o.rejected_rewards for o in outs]),
        extras={k: torch.cat([o.extras[k] for o in outs]) for k in outs[0].extras})


def _summary(cfg: Config, out: Path, steps: int, status: str, data: Prepared | None, timing: dict,
             t_start: float, model_info: dict | None = None) -> dict:
    rows = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    evals = [r for r in rows if "eval_loss" in r]
    trains = [r for r in rows if "loss" in r]
    tail = stats.tail(trains)  # the same "last 10% of training" that review and decide read
    train_last = {k: sum(r[k] for r in tail) / len(tail) for k in (tail[0] if tail else {})
                  if k not in ("step", "epoch")}
    loop_s = timing["train_s"] + timing["reference_s"]  # reference work counts against throughput
    timing = {**timing, "total_s": time.perf_counter() - t_start,
              "pairs_per_second": timing["train_pairs"] / loop_s if loop_s else 0.0,
              "tokens_per_second": timing["train_tokens"] / timing["train_s"] if timing["train_s"] else 0.0,
              "processed_tokens": timing["train_tokens"] + timing["reference_tokens"],
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if torch.cuda.is_available() else {})}
    summary = {
        "objective": cfg.objective, "lora_rank": cfg.lora_rank, "seed": cfg.seed, "steps": steps, "status": status,
        "params": cfg.objective_params(),
        "final_eval": evals[-1] if evals else None, "step0_eval": evals[0] if evals else None,
        "train_last": train_last,
        "data": {k: v.to_dict() for k, v in data.stats.items()} if data else None,
        "length_bias": stats.length_bias([len(p.chosen_ids) for p in data.eval],
                                         [len(p.rejected_ids) for p in data.eval]) if data else None,
        "timing": timing,
        "model": model_info,
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def _diverged(out, cfg, step, loss, grad_norm, timing, t_start, model_info=None):
    _summary(cfg, out, step, "diverged", None, timing, t_start, model_info)
    last = latest_checkpoint(out)
    keep = f"; the last good checkpoint is {last}" if last else ""
    raise TrainingDiverged(f"loss or gradient became non-finite at step {step} (loss={loss}, grad_norm={grad_norm})"
                           f"{keep}. Lower --lr or --beta, or try --objective orpo.")


def _status(out: Path) -> str | None:
    try:
        return json.loads((out / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


# --- weights and checkpoints (safetensors only) ---------------------------------------------------

def save_weights(out: Path, model: torch.nn.Module, tok: object) -> None:
    """LoRA runs: ``adapter/`` for ``PeftModel.from_pretrained``; full fine-tuning: ``model/`` + tokenizer."""
    name = "adapter" if is_peft(model) else "model"
    with atomic_dir(out / name) as d:
        model.save_pretrained(d, safe_serialization=True)
        if name == "model":
            tok.save_pretrained(d)


def save_checkpoint(out: Path, step: int, trainable: list[tuple[str, Tensor]], opt: torch.optim.Optimizer) -> Path:
    folder = out / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(folder) as d:
        save_file({n: p.detach().contiguous() for n, p in trainable}, str(d / "trainable.safetensors"))
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on the GPU draws from the CUDA generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, str(d / "optimizer.safetensors"))
        atomic_write_json(d / "state.json", {"step": step, "param_groups": sd["param_groups"]})
    for old in (out / "checkpoints").glob("step-*"):  # keep only the newest complete one
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _checkpoint_step(folder: Path | None) -> int | None:
    return None if folder is None else int(json.loads((folder / "state.json").read_text())["step"])


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(folder: Path, trainable: list[tuple[str, Tensor]], opt: torch.optim.Optimizer) -> int:
    weights = load_file(str(folder / "trainable.safetensors"))
    with torch.no_grad():
        for n, p in trainable:
            p.copy_(weights[n])
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        if not key.startswith("rng."):
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
    meta = json.loads((folder / "state.json").read_text())
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])
