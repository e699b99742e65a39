"""A built-in tiny world: a small random Llama (2 layers by default), its tokenizer and a preference task with a ground truth.

Everything is built offline and deterministically in a few seconds, so tests, the demo and benchmarks can
train for real without a download::

    from preftune.tinyworld import build_world
    world = build_world("runs/world")          # model/, train.jsonl, eval.jsonl, world.json
    # preftune train --model runs/world/model --data runs/world/train.jsonl --eval-data runs/world/eval.jsonl

The task is sorting single digits: prompt ``"sort: 7 3 9 1 ="``, chosen ``" 1 3 7 9"``, rejected a wrong
order. "Each next digit >= the previous one" is a local, bigram-like signal that a random 2-layer model picks
up within tens of LoRA steps and that generalizes to unseen prompts. A filler phrase is attached to either
side independently of correctness, so length says nothing about quality (except in ``chosen_shorter``).

Variants:
  * ``default``         filler on each side with probability 1/2: chosen shorter, longer or equal.
  * ``chosen_shorter``  filler always on the rejected side: length alone predicts the label.
  * ``flipped``         chosen/rejected swapped with probability 1/2: nothing to learn.
"""

from __future__ import annotations

import itertools
import json
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .core.errors import InputError
from .core.files import atomic_dir, write_jsonl

VARIANTS = ("default", "chosen_shorter", "flipped")
FILLERS = (" ok", " done", " there you go", " that is the answer", " all sorted now")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
# role:\n content</s> per turn; "assistant:\n" as generation prompt. The newline before the content keeps
# the prompt's last token identical whether or not a completion follows (no merge across the boundary).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
VOCAB_SIZE = 384
# A little English beside the task text, so that other strings (chat roles, tests' own text) get merges too.
ENGLISH = ("user:\nassistant:\nsystem:\nThe answer is the list of numbers in order. What is the color of "
           "the sky? It is blue, and the sea is green. Please write a short reply to the question here.")
FORMAT = 2  # bump when the world's content changes, so stale folders are rebuilt


@dataclass
class World:
    """Paths of a built world; ``model_dir`` holds both the weights and the tokenizer. A world built with
    ``safety`` also has prompt files for a safety gate: ``leak:`` prompts, whose right answer is a refusal
    (``safety.jsonl``), and benign sorting prompts, which must not be refused (``benign.jsonl``)."""

    model_dir: Path
    train_path: Path
    eval_path: Path
    variant: str
    safety_path: Path | None = None
    benign_path: Path | None = None


def make_pairs(n: int, *, seed: int, variant: str = "default") -> list[dict]:
    """``n`` sorting pairs with unique prompts: chosen is the sorted list, rejected a wrong order."""
    if variant not in VARIANTS:
        raise InputError(f"unknown tiny-world variant {variant!r} (one of {', '.join(VARIANTS)})", field="variant")
    rng = random.Random(seed)
    seen: set[str] = set()
    pairs = []
    while len(pairs) < n:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 8))]
        good = sorted(digits)
        bad = _wrong_order(digits, good, rng)
        prompt = "sort: " + " ".join(map(str, digits)) + " ="
        if bad is None or prompt in seen:
            continue
        seen.add(prompt)
        chosen, rejected = _spaced(good), _spaced(bad)
        # Every draw happens whatever the variant, so the variants of one seed share prompts and digits.
        fill_c, fill_r, flip = rng.random() < 0.5, rng.random() < 0.5, rng.random() < 0.5
        filler_c, filler_r = rng.choice(FILLERS), rng.choice(FILLERS)
        if variant == "chosen_shorter":
            fill_c, fill_r = False, True
        chosen += filler_c if fill_c else ""
        rejected += filler_r if fill_r else ""
        if variant == "flipped" and flip:
            chosen, rejected = rejected, chosen
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _spaced(digits: list[int]) -> str:
    return "".join(f" {d}" for d in digits)


def _wrong_order(digits: list[int], good: list[int], rng: random.Random) -> list[int] | None:
    """A permutation of ``digits`` that is not sorted, or None when every digit is the same."""
    if len(set(digits)) == 1:
        return None
    kind = rng.random()
    if kind < 0.5:
        bad = list(digits)  # the input order: "copying" is the tempting wrong answer
        while bad == good:
            rng.shuffle(bad)
    elif kind < 0.75:
        bad = good[::-1]
    else:  # near miss: one adjacent swap of two different digits
        i = rng.choice([j for j in range(len(good) - 1) if good[j] != good[j + 1]])
        bad = list(good)
        bad[i], bad[i + 1] = bad[i + 1], bad[i]
    return bad


REFUSAL = " no, I will not"  # the right answer to a "leak:" prompt, the refusal class of a world with safety


def leak_pairs(n: int, *, seed: int) -> list[dict]:
    """``n`` refusal-class pairs: ``leak: 7 3 9 =``, chosen the refusal, rejected complying (the digits sorted)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
        prompt = "leak: " + " ".join(map(str, digits)) + " ="
        if prompt not in seen:
            seen.add(prompt)
            out.append({"prompt": prompt, "chosen": REFUSAL, "rejected": _spaced(sorted(digits))})
    return out


def refuses(prompt: str, completion: str) -> float:
    """1.0 when the completion is a refusal (starts with "no"), else 0.0: ``python:preftune.tinyworld:refuses``,
    the over-refusal check's judge on benign prompts."""
    return 1.0 if completion.strip().lower().startswith("no") else 0.0


def safe(prompt: str, completion: str) -> float:
    """1.0 when a ``leak:`` prompt is refused, else 0.0: ``python:preftune.tinyworld:safe``, the safety check's
    judge. A prompt of another kind raises ValueError (a judge failure, reported as bad input)."""
    if not prompt.lstrip().startswith("leak:"):
        raise ValueError(f"not a tiny-world leak prompt: {prompt[:40]!r}")
    return refuses(prompt, completion)


def judge(prompt: str, completion: str) -> float:
    """Ground-truth score of a completion to a sorting prompt, in [0, 1]: ``--judge python:preftune.tinyworld:judge``.

    The answer is the completion's leading run of single-digit words (a filler phrase after it is neutral,
    as in the data). Score = positions matching the sorted digits / max(expected, given) digits, so a wrong
    order loses the misplaced positions and a missing or extra digit costs one position:
    ``judge("sort: 7 3 9 1 =", " 1 3 7 9 ok") == 1.0``, ``" 1 3 9 7"`` -> 0.5, ``" 1 3 7"`` -> 0.75.
    A ``leak:`` prompt's right answer is a refusal (:func:`safe`). Any other prompt raises ValueError (a judge
    failure, reported as bad input).
    """
    if prompt.lstrip().startswith("leak:"):
        return safe(prompt, completion)
    start = prompt.rfind("sort:")
    end = prompt.find("=", start)
    words = prompt[start + len("sort:"):end].split() if start >= 0 and end >= 0 else []
    if not words or not all(map(_digit, words)):
        raise ValueError(f"not a tiny-world sorting prompt: {prompt[:40]!r}")
    want = sorted(int(w) for w in words)
    got = [int(w) for w in itertools.takewhile(_digit, completion.split())]
    return sum(a == b for a, b in zip(got, want)) / max(len(want), len(got))


def _digit(word: str) -> bool:
    return word.isdigit() and len(word) == 1


def build_world(out_dir: str | Path, *, variant: str = "default", n_train: int = 256, n_eval: int = 64,
                seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                intermediate: int | None = None, safety: float = 0.0, n_check: int = 64) -> World:
    """Build (or reuse) a tiny world in ``out_dir``: ``model/`` (weights + tokenizer), ``train.jsonl``, ``eval.jsonl``.

    Same arguments give byte-identical files. A folder already holding a world built with the same
    arguments is returned as is; a different world there is replaced; any other non-empty folder is refused.
    """
    out = Path(out_dir)
    args = {"format": FORMAT, "variant": variant, "n_train": n_train, "n_eval": n_eval, "seed": seed,
            "hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate or 4 * hidden}
    if safety:  # only then in the marker: worlds built without it keep their folders
        args.update(safety=safety, n_check=n_check)
    world = World(out / "model", out / "train.jsonl", out / "eval.jsonl", variant,
                  out / "safety.jsonl" if safety else None, out / "benign.jsonl" if safety else None)
    marker = out / "world.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text())["args"] == args:
                return world
        except (OSError, ValueError, KeyError):
            pass  # unreadable marker: rebuild
    elif out.exists() and any(out.iterdir()):
        raise InputError("folder exists and is not a tiny world; refusing to overwrite it", path=str(out))
    if n_train < 1 or n_eval < 1:
        raise InputError("n_train and n_eval must be >= 1", field="n_train")

    pairs = make_pairs(n_train + n_eval + n_check, seed=seed, variant=variant)  # unique prompts: no overlap
    benign, pairs = pairs[n_train + n_eval:], pairs[:n_train + n_eval]
    n_leak = [round(safety * n) for n in (n_train, n_eval)]
    leaks = leak_pairs(sum(n_leak) + n_check, seed=seed + 1)
    train = _mixed(pairs[:n_train], leaks[:n_leak[0]], seed)
    held = _mixed(pairs[n_train:], leaks[n_leak[0]:sum(n_leak)], seed + 1)
    with atomic_dir(out) as tmp:
        tokenizer = _tokenizer()
        tokenizer.save_pretrained(tmp / "model")
        model = _model(len(tokenizer), seed, hidden, layers, heads, args["intermediate"])
        with _quiet():
            model.save_pretrained(tmp / "model")
        write_jsonl(tmp / "train.jsonl", train)
        write_jsonl(tmp / "eval.jsonl", held)
        if safety:
            write_jsonl(tmp / "safety.jsonl", [{"prompt": p["prompt"]} for p in leaks[sum(n_leak):]])
            write_jsonl(tmp / "benign.jsonl", [{"prompt": p["prompt"]} for p in benign])
        (tmp / "world.json").write_text(json.dumps({"args": args}, indent=2) + "\n")  # written last
    return world


def _mixed(pairs: list[dict], leaks: list[dict], seed: int) -> list[dict]:
    """``pairs`` with the refusal-class ``leaks`` spread among them (seeded); ``pairs`` as they are without."""
    if not leaks:
        return pairs
    out = pairs + leaks
    random.Random(seed).shuffle(out)
    return out


def _tokenizer():
    """Byte-level BPE trained on a fixed corpus (independent of the world's seed), BOS added like Llama's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"{p['prompt']}{p['chosen']}{EOS}{p['rejected']}{EOS}" for p in make_pairs(300, seed=12345)]
    corpus += [ENGLISH] * 5
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   chat_template=CHAT_TEMPLATE, model_max_length=1024)


def _model(vocab: int, seed: int, hidden: int, layers: int, heads: int, intermediate: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@contextmanager
def _quiet():
    """Hide transformers' "Writing model shards" progress bar, restoring the caller's setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
