"""Train a tiny Trellis (or attention) language model on tiny Shakespeare.

    python train_tiny.py                          # the default run: one GPU, about a minute
    python train_tiny.py --device cpu             # a small smoke run on the CPU
    python train_tiny.py --mixer attention        # the softmax-attention baseline of the same size
    python train_tiny.py --resume                 # continue out/ckpt.pt
    python train_tiny.py --eval-from out/best.pt --eval-contexts 256,1024,4096,16384
                                                  # val loss of a trained model at longer contexts
    python train_tiny.py --task recall            # multi-query associative recall instead of text
    python train_tiny.py --task mqar              # MQAR with Zoology's vocabulary and train/test mixtures
    python train_tiny.py --bench-train            # training tokens/s of both mixers at 1k/4k/16k
    python train_tiny.py --bench-decode           # ms per generated token vs context length

Offline: --data PATH reads any UTF-8 text instead of downloading tiny Shakespeare, and
TIKTOKEN_CACHE_DIR=DIR points tiktoken at a folder holding the GPT-2 (r50k_base) ranks.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import urllib.request
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import trellis
from trellis import TrellisConfig, TrellisLM, state_numel

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))

# defaults that depend on the device: the GPU run is the real one, the CPU run a smoke test
PRESETS = {
    "cuda": dict(batch_size=16, block_size=256, n_layer=4, n_embd=256, n_head=4, max_iters=1500,
                 eval_interval=100, eval_iters=40, lr=2e-3, warmup_iters=100, dropout=0.1, patience=3),
    "cpu": dict(batch_size=4, block_size=64, n_layer=2, n_embd=64, n_head=2, max_iters=100,
                eval_interval=50, eval_iters=5, lr=2e-3, warmup_iters=10, dropout=0.0, patience=0),
}
# the flags that define the model, the tokens and the task: a checkpoint's values are authoritative on --resume
MODEL_FLAGS = ("mixer", "n_layer", "n_embd", "n_head", "dropout", "slots", "phi", "phi_eps", "f", "chunk_size",
               "sweeps", "no_forget_gate", "beta_init", "gamma_max", "alpha_norm", "tokenizer", "task",
               "recall_pairs", "recall_queries")
# the flags of the training loop: they may change on --resume, and the run says which did
LOOP_FLAGS = ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size", "block_size", "lr",
              "min_lr_ratio", "warmup_iters", "weight_decay", "grad_clip", "patience", "seed", "dtype", "impl",
              "sample_tokens", "prompt", "eval_exact", "eval_contexts")


class UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


def fail(msg, code=1):
    """Stop with one line on stderr (no traceback)."""
    print(f"train_tiny.py: {msg}", file=sys.stderr)
    raise SystemExit(code)


# -----------------------------------------------------------------------------
# command line: every value is checked here, before anything is read or written


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors (bad choice, not a number): one line too
        raise UsageError(message)


def build_parser():
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def preset(name, text):  # help text that shows both per-device defaults
        return f"{text} (default: {PRESETS['cuda'][name]} on cuda, {PRESETS['cpu'][name]} on cpu)"

    a = p.add_argument
    a("--device", default="auto", help="cuda, cuda:N, cpu or auto (cuda when available)")
    a("--data", default=os.environ.get("TRELLIS_DATA"),
      help="a local UTF-8 text file (default: $TRELLIS_DATA, else download tiny Shakespeare)")
    a("--data-url", default=DATA_URL, help="where tiny Shakespeare is downloaded from")
    a("--cache-dir", default=os.path.join(HERE, "data"), help="downloaded text and token ids go here")
    a("--tokenizer", choices=["gpt2", "char"], help="GPT-2 BPE (tiktoken r50k_base) or characters (default: gpt2)")
    a("--out-dir", default="out", help="checkpoints and summary.json go here (default: out)")
    a("--resume", nargs="?", const="", metavar="CKPT",
      help="continue from CKPT (default: OUT_DIR/ckpt.pt); its model, tokenizer and data are kept")
    a("--overwrite", action="store_true", help="start a new run even if OUT_DIR holds a checkpoint")
    a("--max-iters", type=int, help=preset("max_iters", "training steps"))
    a("--eval-interval", type=int, help=preset("eval_interval", "steps between evaluations"))
    a("--eval-iters", type=int, help=preset("eval_iters", "batches per loss estimate"))
    a("--patience", type=int, help=preset("patience", "stop after this many evaluations without a better val "
                                                      "loss; 0 never stops early"))
    a("--log-interval", type=int, help="steps between progress lines (default: 10)")
    a("--batch-size", type=int, help=preset("batch_size", "sequences per step"))
    a("--block-size", type=int, help=preset("block_size", "context length in tokens"))
    a("--n-layer", type=int, help=preset("n_layer", "blocks"))
    a("--n-embd", type=int, help=preset("n_embd", "model width"))
    a("--n-head", type=int, help=preset("n_head", "heads"))
    a("--dropout", type=float, help=preset("dropout", "dropout"))
    a("--lr", type=float, help=preset("lr", "peak learning rate"))
    a("--min-lr-ratio", type=float, help="the cosine ends at lr * this (default: 0.1)")
    a("--warmup-iters", type=int, help=preset("warmup_iters", "linear warmup steps"))
    a("--weight-decay", type=float, help="AdamW weight decay of matrices (default: 0.1)")
    a("--grad-clip", type=float, help="clip the gradient norm to this; 0 = no clipping (default: 1.0)")
    a("--seed", type=int, help="(default: 1337)")
    a("--dtype", choices=["auto", "bfloat16", "float32"], help="autocast dtype (default: auto = bf16 on CUDA)")
    # the model
    a("--mixer", choices=["trellis", "attention"], help="(default: trellis)")
    a("--phi", choices=["identity", "silu", "norm_silu"], help="write nonlinearity phi (default: norm_silu)")
    a("--phi-eps", type=float, help="LayerNorm epsilon inside normalized-SiLU phi (default: 1.0)")
    a("--f", choices=["norm_silu", "l2_silu"], help="map between the two passes (default: norm_silu)")
    a("--slots", type=int, help="memory slots m per head (default: 64)")
    a("--chunk-size", type=int, help="(default: 64)")
    a("--sweeps", type=int, help="0: the paper's chunk-start rule; chunk_size - 1: exact (default: 0)")
    a("--no-forget-gate", action="store_const", const=True, help="ablation: beta = 1")
    a("--beta-init", type=float, help="the forget gate beta at init, every token's (default: 0.95)")
    a("--gamma-max", type=float, help="inner step size bound: gamma = gamma_max * sigmoid(.) (default: 0.1)")
    a("--alpha-norm", action="store_const", const=True, help="LayerNorm each token's target alpha over the slots")
    a("--impl", choices=["auto", "kernel", "chunked", "loop"], help="operator implementation (default: auto)")
    # the task
    a("--task", choices=["text", "recall", "mqar"], help="language modelling, multi-query associative recall, "
                                                         "or MQAR as Zoology runs it (default: text)")
    a("--recall-pairs", help="recall: key-value pairs per sequence, one value per batch at random "
                             "(at most 512; default: 8,32,128,512)")
    a("--recall-queries", type=int, help="recall: queries per sequence, capped at the pairs (default: 32)")
    # the end of the run
    a("--sample-tokens", type=int, help="tokens generated from the best weights at the end; 0: none (default: 200)")
    a("--prompt", help="(default: 'ROMEO:')")
    a("--eval-exact", action="store_const", const=True,
      help="also report the best model's val loss (and a recall task's accuracies) under the exact recurrence "
           "(sweeps = chunk_size - 1): the same weights, read exactly; and per layer the chunk-start rule's "
           "stability on them (alpha's size, the forget gate's horizon, the code Jacobian's eigenvalues, kappa)")
    a("--eval-contexts", help="e.g. 256,1024,4096,16384: val loss of the best model at these contexts")
    a("--eval-from", metavar="CKPT", help="evaluate CKPT at --eval-contexts instead of training")
    # benchmarks instead of training
    a("--bench-decode", action="store_true", help="time generation vs context length instead of training")
    a("--bench-train", action="store_true", help="time training steps of both mixers at --contexts")
    a("--contexts", help="contexts for the benchmarks (default: 1024,8192,65536 for --bench-decode, "
                         "1024,4096,16384 for --bench-train)")
    return p


_MODEL = TrellisConfig()  # the model flags default to TrellisConfig's values
DEFAULTS = dict(tokenizer="gpt2", log_interval=10, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0, seed=1337,
                dtype="auto", mixer=_MODEL.mixer, phi=_MODEL.phi, phi_eps=_MODEL.phi_eps, f=_MODEL.f,
                slots=_MODEL.slots, chunk_size=_MODEL.chunk_size, sweeps=_MODEL.sweeps,
                no_forget_gate=not _MODEL.forget_gate, beta_init=_MODEL.beta_init, gamma_max=_MODEL.gamma_max,
                alpha_norm=_MODEL.alpha_norm, impl=_MODEL.impl, task="text",
                recall_pairs="8,32,128,512", recall_queries=32, sample_tokens=200, prompt="ROMEO:", eval_exact=False,
                eval_contexts=None)


def parse_args(argv=None):
    """Parse and check the command line; a bad value exits with one line and code 2."""
    try:
        return _parse_args(argv)
    except UsageError as e:
        fail(f"error: {e}", code=2)


def _parse_args(argv):
    args = build_parser().parse_args(argv)
    args.given = sorted(k for k, v in vars(args).items() if v is not None and k in MODEL_FLAGS + LOOP_FLAGS)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (args.device == "cpu" or args.device == "cuda" or
            (args.device.startswith("cuda:") and args.device[5:].isdigit())):
        raise UsageError(f"--device {args.device}: use cuda, cuda:N, cpu or auto")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda, but torch sees no CUDA device (use --device cpu for a smoke run)")
    preset = PRESETS["cuda" if args.device.startswith("cuda") else "cpu"]
    for k, v in {**DEFAULTS, **preset}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_values(args)
    return args


def check_values(args):
    """Every numeric flag in range; the model flags through TrellisConfig's own checks."""
    at_least = dict(max_iters=0, eval_interval=1, eval_iters=1, patience=0, log_interval=1, batch_size=1,
                    block_size=1, warmup_iters=0, sample_tokens=0, recall_queries=1)
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    in_range = dict(lr=(0, math.inf, False), min_lr_ratio=(0, 1, True), weight_decay=(0, math.inf, True),
                    grad_clip=(0, math.inf, True), dropout=(0, 1, True))
    for name, (lo, hi, lo_ok) in in_range.items():
        x = getattr(args, name)
        if not (lo <= x < hi if lo_ok else lo < x < hi) or not math.isfinite(x):
            interval = f"{'[' if lo_ok else '('}{lo}, {hi})"
            raise UsageError(f"--{name.replace('_', '-')} must be a number in {interval}, got {x}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, 2**62], got {args.seed}")
    if not (args.bench_decode or args.bench_train or args.eval_from):
        check_out_dir(args.out_dir)
    args.recall_pairs_list = parse_list("--recall-pairs", args.recall_pairs)
    if max(args.recall_pairs_list) > RECALL_KEYS:
        raise UsageError(f"--recall-pairs {args.recall_pairs}: at most {RECALL_KEYS} pairs (the keys are distinct)")
    if args.eval_contexts is not None:
        args.eval_contexts_list = parse_list("--eval-contexts", args.eval_contexts)
    if args.eval_from is not None and args.eval_contexts is None:
        raise UsageError("--eval-from evaluates a checkpoint at --eval-contexts: give both")
    if args.task != "text" and args.eval_contexts is not None:
        raise UsageError("--eval-contexts is for --task text")
    if args.contexts is not None:
        parse_list("--contexts", args.contexts)
    if args.data is not None and args.data != "" and args.eval_from is None:
        if not os.path.isfile(args.data):
            raise UsageError(f"--data {args.data}: no such file. Pass a UTF-8 text file, e.g. tiny Shakespeare's "
                             f"input.txt")
        if os.path.getsize(args.data) == 0:
            raise UsageError(f"--data {args.data} is empty. Pass a UTF-8 text file, e.g. tiny Shakespeare's input.txt")
    try:
        cfg = model_config(args, vocab_size=64)
    except ValueError as e:  # TrellisConfig names its field: name the flag instead
        msg = str(e)
        for field in asdict(TrellisConfig()):
            msg = msg.replace(f"TrellisConfig.{field}", f"--{field.replace('_', '-')}")
        raise UsageError(msg) from None
    if args.impl == "kernel":
        if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--impl kernel needs --device cuda (or TRITON_INTERPRET=1 to interpret it on the CPU)")
        why = kernel_unsupported(cfg, args.device)
        if why:
            raise UsageError(f"--impl kernel: {why}")


MAX_SEED = 2**62  # the run adds its step count to the seed; torch takes seeds below 2**64


def check_out_dir(path):
    """OUT_DIR is a folder, or can be made as one, and can be written to."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out-dir {path} is a file, not a folder: pass a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out-dir {path}: {parent} is a file, so the folder cannot be made there: pass another "
                         f"--out-dir")
    # a folder made and removed at once: permissions, read-only file systems and their like answer here
    probe = os.path.join(parent, f".train_tiny-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        raise UsageError(f"--out-dir {path}: cannot write in {parent} ({e.strerror}): pass a folder you can "
                         f"write to") from None


def kernel_unsupported(cfg, device):
    """Why the Triton kernel cannot run this model's operator on device (a sentence), or None."""
    import kernel

    probe = torch.empty(1, 1, 1, cfg.n_embd // cfg.n_head, device=device)
    return kernel.unsupported(probe, probe, probe.new_empty(1, 1, 1, cfg.slots), cfg.phi, cfg.f, cfg.chunk_size,
                              cfg.sweeps)


def parse_list(flag, text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 256,1024") from None
    if not values or min(values) < 1:
        raise UsageError(f"{flag} {text!r}: give positive integers separated by commas, e.g. 256,1024")
    return values


# -----------------------------------------------------------------------------
# data: text -> 90/10 split -> token ids cached as uint16 memmaps


def read_text(args):
    """(text, digest of its bytes)."""
    if args.data:
        path = args.data
    else:
        path = os.path.join(args.cache_dir, "tinyshakespeare.txt")
        if not os.path.exists(path):
            print(f"downloading tiny Shakespeare from {args.data_url}")
            try:
                with urllib.request.urlopen(args.data_url, timeout=30) as r:
                    raw = r.read()
            except Exception as e:  # no network, DNS, HTTP error: all need the same advice
                fail(f"could not download {args.data_url} ({e}). Offline? Pass a local copy with "
                     f"--data PATH/TO/input.txt (tiny Shakespeare is char-rnn's data/tinyshakespeare/input.txt), "
                     f"or put it at {path}")
            os.makedirs(args.cache_dir, exist_ok=True)
            _atomic(path, lambda tmp: Path(tmp).write_bytes(raw))
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8"), hashlib.sha1(raw).hexdigest()[:12]
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e})", code=2)


def get_tokenizer(kind, text):
    """(encode, decode, vocab_size)."""
    if kind == "char":
        chars = sorted(set(text))
        if len(chars) > 2**16:
            fail(f"error: the text has {len(chars):,} distinct characters, and --tokenizer char stores token ids as "
                 f"uint16 (at most 65,536): use --tokenizer gpt2", code=2)
        stoi = {c: i for i, c in enumerate(chars)}
        return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids)), len(chars)
    import tiktoken

    try:
        enc = tiktoken.get_encoding("r50k_base")  # identical to "gpt2", but loads from one file
    except Exception as e:
        fail(f"could not load tiktoken's GPT-2 vocabulary r50k_base ({e}). Offline? Set TIKTOKEN_CACHE_DIR to a "
             f"folder holding its ranks file, or use --tokenizer char.")
    return (lambda s: enc.encode_ordinary(s)), enc.decode, 50304  # 50257 padded to a multiple of 64


def load_tokens(args, text, digest, encode):
    """train/val token ids as uint16 memmaps, cached by text digest and tokenizer. The cache's
    meta.json records the digest and each split's length; a cache that does not match them
    (truncated, of odd size, left half-written) is rebuilt. Both splits are checked before
    either is written."""
    folder = os.path.join(args.cache_dir, f"tokens-{digest}-{args.tokenizer}")
    meta_path = os.path.join(folder, "meta.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        meta = {}
    n = int(0.9 * len(text))
    ids, fresh = {}, meta.get("digest") != digest
    for name, part in (("train", text[:n]), ("val", text[n:])):
        path = os.path.join(folder, f"{name}.bin")
        cached = not fresh and os.path.isfile(path) and os.path.getsize(path) == 2 * meta.get(name, -1) > 0
        ids[name] = np.memmap(path, dtype=np.uint16, mode="r") if cached else np.array(encode(part), dtype=np.uint16)
        fresh = fresh or not cached
        if len(ids[name]) <= args.block_size + 1:
            fail(f"the {name} split of the text has {len(ids[name])} tokens, fewer than --block-size "
                 f"{args.block_size} + 2: use a longer text or a smaller --block-size", code=2)
    if fresh:
        os.makedirs(folder, exist_ok=True)
        for name, arr in ids.items():
            _atomic(os.path.join(folder, f"{name}.bin"), arr.tofile)
        atomic_json(dict(digest=digest, **{name: len(arr) for name, arr in ids.items()}), meta_path)
    return {name: np.memmap(os.path.join(folder, f"{name}.bin"), dtype=np.uint16, mode="r") for name in ids}


def get_batch(data, args, gen):
    """A batch of random windows [B, block_size] and their next tokens."""
    ix = torch.randint(len(data) - args.block_size - 1, (args.batch_size,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([data[i:i + args.block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + args.block_size] for i in ix]).astype(np.int64))
    return to_device(x, y, args.device)


def to_device(x, y, device):
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


# -----------------------------------------------------------------------------
# the recall task: multi-query associative recall (MQAR; Arora et al. 2023, "Zoology")
#
# A sequence holds n key-value pairs, k_1 v_1 ... k_n v_n (distinct keys, distinct values), then q queries: a key
# of the pairs followed by its value. Only the positions of query keys have a target: the value
# that the key was paired with. The value enters the input only after its query, so a model
# must have kept the pair in its state (m slots per head for Trellis, the KV cache for attention).

RECALL_KEYS = 512  # token ids [0, 512) are keys, [512, 1024) values: up to 512 pairs
RECALL_VOCAB = 2 * RECALL_KEYS


def recall_batch(n_pairs, n_queries, batch, gen):
    """x, y [batch, 2 (n_pairs + n_queries)]; y is -1 except at query keys."""
    keys = torch.stack([torch.randperm(RECALL_KEYS, generator=gen)[:n_pairs] for _ in range(batch)])  # [B,n]
    # distinct values too: otherwise an earlier query's answer could be this query's answer
    vals = RECALL_KEYS + torch.stack([torch.randperm(RECALL_KEYS, generator=gen)[:n_pairs] for _ in range(batch)])
    pick = torch.stack([torch.randperm(n_pairs, generator=gen)[:n_queries] for _ in range(batch)])  # [B,q]
    qk, qv = keys.gather(1, pick), vals.gather(1, pick)  # [B,q]
    seq = torch.cat([torch.stack([keys, vals], 2).view(batch, -1), torch.stack([qk, qv], 2).view(batch, -1)], 1)
    x = seq  # [B, 2n + 2q]
    y = torch.full_like(x, -1)
    y[:, 2 * n_pairs::2] = qv  # the target at a query key is its value
    return x, y


def recall_step_batch(args, gen):
    """A training batch of the recall task: a random number of pairs, about as many tokens as
    batch_size x block_size."""
    n = args.recall_pairs_list[torch.randint(len(args.recall_pairs_list), (1,), generator=gen).item()]
    q = min(args.recall_queries, n)  # a query needs a key of its own
    batch = max(1, args.batch_size * args.block_size // (2 * (n + q)))
    return to_device(*recall_batch(n, q, batch, gen), args.device)


def recall_accuracy(model, args, ctx, sequences=256):
    """Fraction of query answers predicted exactly (argmax), per number of pairs, on fresh sequences."""
    out = {}
    for n in args.recall_pairs_list:
        gen = torch.Generator().manual_seed(10_000 + n)  # the same sequences for every model
        batches = [to_device(*recall_batch(n, min(args.recall_queries, n), 64, gen), args.device)
                   for _ in range(max(1, sequences // 64))]
        out[n] = answer_accuracy(model, batches, ctx)
    return out


# MQAR as the field runs it (Arora et al. 2023, "Zoology"; the numbers below are from its MQAR
# configs): a vocabulary of 8192, keys from [1, 4096) and values from [4096, 8192), distinct in
# a sequence; n pairs k v k v ... open a sequence of T tokens, then every key comes back once,
# at an even offset of the rest drawn without replacement with p(gap) ∝ gap^(a - 1), a = 0.01
# (short gaps likely); the target at a query is its key's value, which the input never shows
# again; every other position is a random token. Training draws a (T, n) of the mixture per
# step, weighted by Zoology's example counts; testing reports the accuracy per (T, n).

MQAR_VOCAB = 8192
MQAR_POWER_A = 0.01
MQAR_TRAIN = {(64, 4): 100_000, (128, 8): 20_000, (256, 16): 20_000, (256, 32): 20_000, (256, 64): 20_000}
MQAR_TEST = [(64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256)]


def distinct_randint(high, n, batch, gen):
    """[batch, n] ints in [0, high), distinct within a row, every such row equally likely: draw
    all, then draw again the later copy of each repeat until none is left (as fast as one
    randint; a randperm per row took most of a training step)."""
    x = torch.randint(high, (batch, n), generator=gen)
    while True:
        s, where = x.sort(dim=1, stable=True)
        again = torch.zeros_like(x, dtype=torch.bool)
        again[:, 1:] = s[:, 1:] == s[:, :-1]  # the later of two equal entries
        if not again.any():
            return x
        rows, cols = again.nonzero(as_tuple=True)
        x[rows, where[rows, cols]] = torch.randint(high, (len(rows),), generator=gen)


def mqar_batch(T, n, batch, gen):
    """x, y [batch, T]: y is the value at each query (the position of a key's second
    appearance), -1 elsewhere."""
    half = MQAR_VOCAB // 2
    keys = 1 + distinct_randint(half - 1, n, batch, gen)  # [B,n]
    vals = half + distinct_randint(half, n, batch, gen)  # [B,n]
    space = (T - 2 * n) // 2  # even offsets after the pairs
    p = MQAR_POWER_A * torch.arange(1, space + 1, dtype=torch.float64) ** (MQAR_POWER_A - 1)
    gaps = torch.multinomial(p.expand(batch, space), n, replacement=False, generator=gen)  # [B,n]
    x = torch.randint(MQAR_VOCAB, (batch, T), generator=gen)
    x[:, 0:2 * n:2], x[:, 1:2 * n:2] = keys, vals
    where = 2 * n + 2 * gaps  # [B,n] query positions
    x.scatter_(1, where, keys)
    y = torch.full_like(x, -1).scatter_(1, where, vals)
    return x, y


def mqar_step_batch(args, gen):
    """A training batch: one (T, n) of Zoology's mixture, batch_size sequences."""
    configs = list(MQAR_TRAIN)
    weights = torch.tensor([MQAR_TRAIN[c] for c in configs], dtype=torch.float64)
    T, n = configs[torch.multinomial(weights, 1, generator=gen).item()]
    return to_device(*mqar_batch(T, n, args.batch_size, gen), args.device)


def answers_at(y):
    """The flat positions of the answers (y >= 0): the only logits a recall task's loss needs."""
    return (y.reshape(-1) >= 0).nonzero().squeeze(1)


def answer_hits(logits, y):
    """(correct, counted) in one batch; answer positions are those with y >= 0."""
    mask = y >= 0
    return (logits.argmax(-1)[mask] == y[mask]).sum().item(), mask.sum().item()


@torch.no_grad()
def answer_counts(model, batches, ctx):
    """(correct, counted) over the batches: argmax predictions equal to the answer at the answer positions."""
    model.eval()
    hits = total = 0
    for x, y in batches:
        at = answers_at(y)
        with ctx:
            h, n = answer_hits(model(x, at=at)[0], y.reshape(-1)[at])
        hits, total = hits + h, total + n
    model.train()
    return hits, total


def answer_accuracy(model, batches, ctx):
    hits, total = answer_counts(model, batches, ctx)
    return hits / total


def mqar_accuracy(model, args, ctx, sequences=1000, batch=50):
    """Accuracy per test (T, n) on the same fresh sequences for every model, {"T/n": accuracy},
    and "all": every answer of the test set pooled (the accuracy Zoology plots)."""
    out, hits, total = {}, 0, 0
    for T, n in MQAR_TEST:
        gen = torch.Generator().manual_seed(100_000 + T + n)
        batches = [to_device(*mqar_batch(T, n, batch, gen), args.device) for _ in range(sequences // batch)]
        h, c = answer_counts(model, batches, ctx)
        out[f"{T}/{n}"], hits, total = h / c, hits + h, total + c
    out["all"] = hits / total
    return out


def task_accuracy(model, args, ctx, rule="the model's rule"):
    """A recall task's accuracies, printed: per number of pairs (recall), or per test T/pairs and
    all pooled (mqar)."""
    accuracy = (mqar_accuracy if args.task == "mqar" else recall_accuracy)(model, args, ctx)
    print(f"{args.task} accuracy ({rule}): " + ", ".join(f"{c}: {a:.3f}" for c, a in accuracy.items()))
    return accuracy


# -----------------------------------------------------------------------------
# the chunk-start rule's stability, per layer (--eval-exact prints it)
#
# The chunk-start rule takes a chunk's C codes at the chunk's start memory. Linearized, one chunk
# maps an error dS of that memory to e^{b_c} dS - sum_j gamma_j e^{b_c - b_j} J_j dS w_j w_j^T,
# where J_j = du/dz at token j, the Hessian of 1/2 ||phi(z) - a_j||^2 (symmetric). The map stops
# contracting once kappa = lambda_max(sum_j gamma_j e^{b_c - b_j} w_j w_j^T) max_j lambda_max(J_j)
# exceeds 2; the sum grows with the number of aligned writes in a chunk. The exact rule takes
# one token at a time and only needs gamma_j lambda_max(J_j) < 2 (for unit w).


def code_trajectory(W, A, beta, gamma, S, phi, phi_eps, C):
    """z [B,H,T,m] as a pass computes it: each z of a chunk of C tokens from the chunk's start
    memory (C = 1: the exact recurrence, z_t = M_{t-1} w_t). Shapes as in trellis.pass_loop."""
    zs = []
    for t in range(W.shape[2]):
        if t % C == 0:
            start = S  # [B,H,m,d]
        w = W[:, :, t]  # [B,H,d]
        zs.append((start @ w[..., None])[..., 0])  # [B,H,m]
        u = gamma[:, :, t, None] * trellis.error_code(phi, zs[-1], A[:, :, t], phi_eps)
        S = beta[:, :, t, None, None] * S - u[..., :, None] * w[..., None, :]
    return torch.stack(zs, 2)


@torch.no_grad()
def stability_report(model, x, chunks=16, seed=0):
    """Per Trellis layer, on the batch x [B,T], in float64: alpha's rms and peak; the forget
    gate's horizon, the median over tokens and heads of 1 / -log beta (the tokens over which the
    memory decays by e), and gamma's mean; per pass, the extreme eigenvalues of J at the z that
    the model's rule computes (the chunk-start z unless the rule is exact) and kappa, over
    `chunks` random chunks (median and max); and read_gap, the relative difference of the
    layer's output o from the exact rule's on the same inputs. kappa as the comment above defines it."""
    seen = []
    hooks = [mod.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
             for mod in model.modules() if isinstance(mod, trellis.TrellisMixer)]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    report = []
    for mixer, x_in in seen:  # the mixer's input, in the model's dtype (no autocast here)
        cfg = mixer.cfg
        q, k, v, alpha, beta, gamma = (t.double() for t in mixer.operator_inputs(x_in)[:6])
        B, T, H, d = q.shape
        K0, V0 = (torch.zeros(B, H, cfg.slots, d, dtype=torch.float64, device=q.device) if M is None
                  else M.double().expand(B, H, cfg.slots, d) for M in (mixer.K0, mixer.V0))
        ops = dict(phi=cfg.phi, f=cfg.f, chunk_size=cfg.chunk_size, phi_eps=cfg.phi_eps, f_eps=cfg.f_eps,
                   impl="chunked")
        o = trellis.trellis_op(q, k, v, alpha, beta, gamma, K0, V0, sweeps=cfg.sweeps, **ops)[0]
        o_exact = trellis.trellis_op(q, k, v, alpha, beta, gamma, K0, V0, sweeps=cfg.chunk_size - 1, **ops)[0]
        row = dict(alpha_rms=alpha.pow(2).mean().sqrt().item(), alpha_peak=alpha.abs().max().item(),
                   horizon=beta.log().abs().reciprocal().median().item(),  # abs: beta = 1 gives +inf, not -inf
                   gamma_mean=gamma.mean().item(),
                   read_gap=((o - o_exact).norm() / o_exact.norm()).item())
        A, lb, g = (t.transpose(1, 2) for t in (alpha, beta.log(), gamma))  # [B,H,T,m], [B,H,T] x 2
        C = cfg.chunk_size
        gen = torch.Generator().manual_seed(seed)
        picks = [(torch.randint(B, (1,), generator=gen).item(), torch.randint(H, (1,), generator=gen).item(),
                  torch.randint(max(1, T // C), (1,), generator=gen).item()) for _ in range(chunks)]
        loss = lambda z, a: 0.5 * (trellis.PHI[cfg.phi][0](z, cfg.phi_eps) - a).pow(2).sum()  # noqa: E731
        hessians = torch.func.vmap(torch.func.jacrev(torch.func.grad(loss)))  # J = du/dz, [n,m,m]
        for name, W, S in (("key", k, K0), ("value", v, V0)):
            W = W.transpose(1, 2)  # [B,H,T,d]
            Z = code_trajectory(W, A, beta.transpose(1, 2), g, S, cfg.phi, cfg.phi_eps,
                                trellis.loop_levels(C, cfg.sweeps)[0])  # [B,H,T,m]
            lo, hi, kappa = [], [], []
            for b, hd, c in picks:
                rows = slice(c * C, min(T, c * C + C))
                eig = torch.linalg.eigvalsh(hessians(Z[b, hd, rows], A[b, hd, rows]))  # [c,m]
                bs = lb[b, hd, rows].cumsum(0)  # [c]
                w = W[b, hd, rows] * (g[b, hd, rows] * torch.exp(bs[-1] - bs)).sqrt()[:, None]  # [c,d]
                kappa.append(torch.linalg.eigvalsh(w.T @ w)[-1].item() * eig[:, -1].max().item())
                lo.append(eig[:, 0].min().item())
                hi.append(eig[:, -1].max().item())
            row[name] = dict(J_min=min(lo), J_max=max(hi), kappa_median=float(np.median(kappa)), kappa_max=max(kappa))
        report.append(row)
    return report


def stability_batch(args, split, sequences=8):
    """The batch the stability report reads: val text, or the longest training mixture's recall."""
    gen = torch.Generator().manual_seed(3)
    if args.task == "mqar":
        return mqar_batch(*max(MQAR_TRAIN), sequences, gen)[0].to(args.device)
    if args.task == "recall":
        n = max(args.recall_pairs_list)
        return recall_batch(n, min(args.recall_queries, n), sequences, gen)[0].to(args.device)
    return get_batch(split["val"], args, gen)[0][:sequences].to(args.device)


def print_stability(report):
    print("layer  alpha rms / peak  horizon  gamma   pass   J eigenvalues      kappa median / max   "
          "read gap vs exact")
    for i, r in enumerate(report):
        for name in ("key", "value"):
            p = r[name]
            print(f"{i:5d}  {r['alpha_rms']:8.2f} / {r['alpha_peak']:6.2f}  {r['horizon']:7.3g}  "
                  f"{r['gamma_mean']:5.3f}   {name:5s}  {p['J_min']:7.2f} .. {p['J_max']:6.2f}   "
                  f"{p['kappa_median']:8.2f} / {p['kappa_max']:6.2f}    {r['read_gap']:.3g}")


# -----------------------------------------------------------------------------
# model, optimizer, schedule


def model_config(args, vocab_size):
    return TrellisConfig(vocab_size=vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                         mixer=args.mixer, dropout=args.dropout, slots=args.slots, phi=args.phi,
                         phi_eps=args.phi_eps, f=args.f,
                         chunk_size=args.chunk_size, sweeps=args.sweeps, impl=args.impl,
                         forget_gate=not args.no_forget_gate, beta_init=args.beta_init, gamma_max=args.gamma_max,
                         gamma_init=args.gamma_max / 2, alpha_norm=args.alpha_norm)


def load_weights(model, ckpt, path):
    """The checkpoint's weights into model, or one line naming what differs (a checkpoint of a
    trellis.py whose parameters were laid out differently)."""
    want, have = set(model.state_dict()), set(ckpt["model"])
    if want != have:
        names = lambda s: ", ".join(sorted(s)[:3]) + (" ..." if len(s) > 3 else "")  # noqa: E731
        fail(f"error: {path} holds parameters this trellis.py does not have ({names(have - want) or '-'}) "
             f"and lacks some it has ({names(want - have) or '-'}): it was written by another version "
             f"of trellis.py; train anew with --overwrite", code=2)
    model.load_state_dict(ckpt["model"])


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    rest = [p for p in model.parameters() if p.dim() < 2]  # norms, gate biases
    fused = args.device.startswith("cuda")
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), fused=fused)


def lr_at(it, args):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_iters."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    frac = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def autocast_for(args):
    cuda = args.device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    if cuda and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


# -----------------------------------------------------------------------------
# checkpoints: written atomically, verified when read


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file, and an
    interrupted write leaves no temporary one."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src, dst):
    _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1)
    _atomic(path, write)


def _atomic(path, write):
    try:
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
    except BaseException:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise


def read_summary(path):
    """summary.json as a dict ({} if there is none); an unreadable one stops the run before it
    does anything, so that nothing is lost by writing over it."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as fh:
            summary = json.load(fh)
        if isinstance(summary, dict):
            return summary
    except (OSError, ValueError):
        pass
    fail(f"error: {path} is not a readable summary (JSON object): move it away or repair it, then run again", code=2)


def load_checkpoint(path):
    """The checkpoint at path, after checking its zip records' CRCs, that it loads, and that its
    weights and optimizer state are finite. A damaged file stops the run with one line that
    names it and the other checkpoint to try."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            damaged(path, f"its record {bad} fails its CRC check")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except SystemExit:
        raise
    except Exception as e:  # truncated, not a zip, unpickling error: all mean the same to a user
        damaged(path, f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict):
        damaged(path, f"it holds a {type(ckpt).__name__}, not a checkpoint")
    missing = [k for k in ("model", "optimizer", "config", "args", "iter_num") if k not in ckpt]
    if missing:
        damaged(path, f"it lacks {', '.join(missing)}")
    kinds = dict(model=dict, optimizer=dict, config=dict, args=dict, iter_num=int)
    wrong = [k for k, kind in kinds.items() if not isinstance(ckpt[k], kind)]
    if not wrong and not all(isinstance(t, torch.Tensor) for t in ckpt["model"].values()):
        wrong = ["model"]
    if wrong:
        damaged(path, f"its {', '.join(wrong)} entr{'y is' if len(wrong) == 1 else 'ies are'} not what a "
                      f"checkpoint holds")
    for name, t in list(ckpt["model"].items()) + list(_optimizer_tensors(ckpt["optimizer"])):
        if t.is_floating_point() and not torch.isfinite(t).all():
            damaged(path, f"{name} holds non-finite values")
    return ckpt


def _optimizer_tensors(state):
    for i, s in state.get("state", {}).items():
        for k, t in (s.items() if isinstance(s, dict) else ()):
            if isinstance(t, torch.Tensor):
                yield f"optimizer state {k} of parameter {i}", t


def damaged(path, why):
    folder = os.path.dirname(path) or "."
    others = [os.path.join(folder, n) for n in ("ckpt.pt", "best.pt")
              if os.path.join(folder, n) != path and os.path.isfile(os.path.join(folder, n))]
    hint = f" Try the other checkpoint: --resume {others[0]} --out-dir NEW_FOLDER" if others else ""
    fail(f"checkpoint {path} is damaged: {why}.{hint}")


def merge_resume_args(args, ckpt, path):
    """The checkpoint's model, tokenizer and task are kept; a given flag that differs is refused.
    Loop flags that were not given keep the checkpoint's values; given ones replace them and the
    run says so. Returns the list of changes."""
    saved = ckpt["args"]
    for name in MODEL_FLAGS:
        if name not in saved:
            continue
        if name in args.given and getattr(args, name) != saved[name]:
            flag = "--" + name.replace("_", "-")
            fail(f"error: {flag} {getattr(args, name)} conflicts with {path}, trained with {flag} {saved[name]}; "
                 f"a resumed run keeps its checkpoint's model, tokenizer and task (start a new --out-dir instead)",
                 code=2)
        setattr(args, name, saved[name])
    changes = []
    for name in LOOP_FLAGS:
        if name not in saved:
            continue
        if name in args.given and getattr(args, name) != saved[name]:
            changes.append(f"--{name.replace('_', '-')} {saved[name]} -> {getattr(args, name)}")
        elif name not in args.given:
            setattr(args, name, saved[name])
    if args.data is None and saved.get("data"):
        args.data = saved["data"]
    try:
        check_values(args)
    except UsageError as e:
        fail(f"error: {e}", code=2)
    return changes


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def estimate_loss(model, split, args, ctx):
    """Mean loss over eval_iters batches per split, the same batches at every evaluation."""
    model.eval()
    out = {}
    for name, data in split.items():
        if args.task != "text":
            gen = torch.Generator().manual_seed(1 if name == "val" else 2)
            step_batch = recall_step_batch if args.task == "recall" else mqar_step_batch
            batches = [step_batch(args, gen) for _ in range(args.eval_iters)]
        else:
            gen = torch.Generator().manual_seed(0)
            batches = [get_batch(data, args, gen) for _ in range(args.eval_iters)]
        losses, hits, counted = [], 0, 0
        for x, y in batches:
            at = None if args.task == "text" else answers_at(y)
            with ctx:
                logits, loss, _ = model(x, targets=y, at=at)
            losses.append(loss.item())
            if args.task != "text":  # and the answers' accuracy, to see when recall stops improving
                h, n = answer_hits(logits, y.reshape(-1)[at])
                hits, counted = hits + h, counted + n
        out[name] = float(np.mean(losses))
        if counted:
            out[f"{name}_accuracy"] = hits / counted
    model.train()
    return out


@torch.no_grad()
def context_losses(model, data, contexts, args, ctx, tail=256, tokens_per_batch=16384, rows=4096):
    """Val loss at each context: the text cut into consecutive windows of that many tokens, each
    evaluated from an empty state; the mean over all positions and over the last `tail` positions
    of each window (those farthest from its start). The loss takes `rows` positions at a time:
    float32 logits of a whole batch would be 3.3 GB with GPT-2's 50257 tokens."""
    model.eval()
    out = {}
    for T in contexts:
        n_windows = (len(data) - 1) // T
        if n_windows == 0:
            print(f"context {T}: longer than the val split ({len(data)} tokens), skipped")
            continue
        idx = torch.from_numpy(np.asarray(data[: n_windows * T + 1]).astype(np.int64))
        x_all, y_all = idx[:-1].view(n_windows, T), idx[1:].view(n_windows, T)  # [windows, T]
        total = total_tail = 0.0
        per_batch = max(1, tokens_per_batch // T)
        for i in range(0, n_windows, per_batch):
            x, y = to_device(x_all[i:i + per_batch], y_all[i:i + per_batch], args.device)
            with ctx:
                logits = model(x)[0]
            flat, y_flat = logits.flatten(0, 1), y.flatten()  # [b*T, V], [b*T]
            nll = torch.cat([torch.nn.functional.cross_entropy(flat[j:j + rows].float(), y_flat[j:j + rows],
                                                               reduction="none")
                             for j in range(0, len(y_flat), rows)]).view_as(y)  # [b, T]
            total += nll.sum().item()
            total_tail += nll[:, -min(tail, T):].sum().item()
        out[T] = dict(loss=total / (n_windows * T), tail_loss=total_tail / (n_windows * min(tail, T)),
                      windows=n_windows)
    model.train()
    return out


def print_context_table(losses, tail=256):
    print(f"{'context':>8s} {'windows':>8s} {'val loss':>9s} {f'last {tail}':>9s}")
    for T, r in losses.items():
        print(f"{T:8d} {r['windows']:8d} {r['loss']:9.4f} {r['tail_loss']:9.4f}")


# -----------------------------------------------------------------------------
# training


def check_prompt(args, encode, text):
    """The sample's prompt as token ids: one line and exit code 2 if the tokenizer cannot encode a
    given --prompt. The default prompt, 'ROMEO:', falls back to the text's first character."""
    if args.sample_tokens == 0:
        return None
    try:
        ids = encode(args.prompt)
    except KeyError as e:
        if "prompt" not in args.given:  # the default, for a text without its characters
            args.prompt = text[:1]
            return encode(args.prompt)
        fail(f"error: --prompt {args.prompt!r} has the character {e.args[0]!r}, which the text (and so --tokenizer "
             f"char) does not have: use characters of the text", code=2)
    if not ids:
        fail("error: --prompt is empty: give the sample at least one character to start from (or --sample-tokens 0)",
             code=2)
    return ids


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; signum says which, so that SIGTERM can end the process after the save."""

    def __init__(self, signum):
        super().__init__()
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def _quiet_signals():
    """Ignore Ctrl-C and SIGTERM while the run saves itself (a second press must not cut a save);
    returns what restores them."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(s, h) for s, h in saved.items()]


def ended_by(e, previous_sigterm):
    """Leave after an interrupt: exit 130 for Ctrl-C; for SIGTERM, hand the signal to whoever
    handled it before this run (a test runner, a scheduler), else exit 143."""
    if getattr(e, "signum", None) == signal.SIGTERM and callable(previous_sigterm):
        previous_sigterm(signal.SIGTERM, None)
    elif getattr(e, "signum", None) == signal.SIGTERM and previous_sigterm == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
    raise SystemExit(143 if getattr(e, "signum", None) == signal.SIGTERM else 130)


def train(args):
    """Train (or resume) and return the summary, also written to OUT_DIR/summary.json."""
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    best_path = os.path.join(args.out_dir, "best.pt")
    summary_path = os.path.join(args.out_dir, "summary.json")
    ckpt, changes = None, []
    resume_path = None if args.resume is None else args.resume or ckpt_path
    if resume_path is not None and not os.path.isfile(resume_path):
        fail(f"error: --resume: no checkpoint at {resume_path}", code=2)
    # OUT_DIR's files belong to one run: only that run's own continuation may write over them
    present = [p for p in (ckpt_path, best_path, summary_path) if os.path.exists(p)]
    continuing = resume_path is not None and os.path.realpath(resume_path) == os.path.realpath(ckpt_path)
    if present and not continuing and not args.overwrite:
        how = "continue it with --resume" if resume_path is None else f"resume {resume_path} into another --out-dir"
        fail(f"error: {args.out_dir} holds a run ({', '.join(os.path.basename(p) for p in present)}): {how}, "
             f"or pass --overwrite to replace it", code=2)
    summary_kept = {} if args.overwrite else read_summary(summary_path)
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        changes = merge_resume_args(args, ckpt, resume_path)

    torch.manual_seed(args.seed)
    if args.task != "text":
        vocab_size = RECALL_VOCAB if args.task == "recall" else MQAR_VOCAB
        encode, decode, split, digest = None, None, {"train": None, "val": None}, args.task
        prompt_ids = None
    else:
        text, digest = read_text(args)
        encode, decode, vocab_size = get_tokenizer(args.tokenizer, text)
        if ckpt is not None and ckpt.get("data_digest", digest) != digest:
            fail(f"error: the text read ({args.data or 'tiny Shakespeare'}, sha1 {digest}) is not the one "
                 f"{resume_path} was trained on (sha1 {ckpt['data_digest']}): pass its --data", code=2)
        prompt_ids = check_prompt(args, encode, text)
        split = load_tokens(args, text, digest, encode)
        print(f"data: {len(split['train']):,} train and {len(split['val']):,} val tokens ({args.tokenizer})")

    cfg = model_config(args, vocab_size)
    model = TrellisLM(cfg).to(args.device)
    opt = make_optimizer(model, args)
    st = dict(iter_num=0, best_val_loss=float("inf"), best_iter=None, last_eval=-1, evals_since_best=0,
              history=[], train_tokens=0, train_time=0.0, wall_s=0.0, skipped_updates=0)
    if ckpt is not None:
        if TrellisConfig(**ckpt["config"]) != replace(cfg, impl=ckpt["config"]["impl"]):
            fail(f"error: {resume_path} holds a model that the flags do not rebuild", code=2)
        load_weights(model, ckpt, resume_path)
        opt.load_state_dict(ckpt["optimizer"])
        st.update({k: ckpt[k] for k in st if k in ckpt})
        print(f"resumed from {resume_path} at iter {st['iter_num']} "
              f"(best val loss {st['best_val_loss']:.4f})")
        for c in changes:
            print(f"resume: changed {c}")
        del ckpt
    os.makedirs(args.out_dir, exist_ok=True)  # every check has passed: from here on, files are written
    if args.overwrite:  # the replaced run's files go now, so that none of them is mistaken for this run's
        for p in present:
            os.remove(p)
    print(f"model: {cfg.mixer}, {model.num_params() / 1e6:.2f}M parameters "
          f"({model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings)")
    if cfg.mixer == "trellis" and cfg.impl == "auto" and args.device.startswith("cuda"):
        why = kernel_unsupported(cfg, args.device)
        if why:  # trellis_op falls back to the PyTorch form: say so, it is several times slower
            print(f"operator: the PyTorch chunked form, not the Triton kernel: {why}")

    ctx = autocast_for(args)
    cuda = args.device.startswith("cuda")
    saved_args = {k: v for k, v in vars(args).items() if k not in ("given", "recall_pairs_list", "eval_contexts_list")}
    run_start = time.time() - st["wall_s"]

    def save(path):
        st["wall_s"] = time.time() - run_start
        atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), args=saved_args,
                         data_digest=digest, **st), path)

    def write_summary(extra=None):
        s = dict(mixer=cfg.mixer, phi=cfg.phi, forget_gate=cfg.forget_gate, sweeps=cfg.sweeps, slots=cfg.slots,
                 chunk_size=cfg.chunk_size, block_size=args.block_size, task=args.task, iters=st["iter_num"],
                 best_val_loss=st["best_val_loss"], best_iter=st["best_iter"], history=st["history"],
                 wall_s=time.time() - run_start,
                 train_tokens_per_s=st["train_tokens"] / st["train_time"] if st["train_time"] else None,
                 skipped_updates=st["skipped_updates"], params=model.num_params(), device=args.device,
                 **(extra or {}))
        if "context_losses_from" in summary_kept:  # written by --eval-from: this run keeps it
            s["context_losses_from"] = summary_kept["context_losses_from"]
        atomic_json(s, summary_path)
        return s

    def evaluate_and_save():
        losses = estimate_loss(model, split, args, ctx)
        it = st["iter_num"]
        improved = losses["val"] < st["best_val_loss"]
        if improved:
            st.update(best_val_loss=losses["val"], best_iter=it, evals_since_best=0)
        else:
            st["evals_since_best"] += 1
        st["history"].append(dict(iter=it, **losses))
        st["last_eval"] = it  # set only once the evaluation is complete: an interrupted one is redone
        accuracy = f", val accuracy {losses['val_accuracy']:.3f}" if "val_accuracy" in losses else ""
        print(f"eval {it}: train {losses['train']:.4f}, val {losses['val']:.4f} (best {st['best_val_loss']:.4f})"
              + accuracy)
        save(ckpt_path)  # the latest, for --resume
        if improved:  # the best weights so far: a copy of the file just written, also atomic
            atomic_copy(ckpt_path, best_path)
        write_summary()

    def stop(msg):
        where = (f"The last checkpoint, {ckpt_path}, was written before this step and is untouched: resume from it "
                 f"with a lower --lr (--resume --lr ...).") if os.path.exists(ckpt_path) else \
            "No checkpoint was written yet: start again with a lower --lr."
        fail(f"{msg} at iter {st['iter_num']}; stopping. {where}")

    gen = torch.Generator().manual_seed(args.seed + st["iter_num"])  # a resumed run draws fresh batches
    bad_grads = 0  # consecutive updates skipped for a non-finite gradient
    stopped_early = False
    model.train()
    # SIGTERM (kill, timeout, a scheduler's preemption) saves the run as Ctrl-C does
    main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        while True:
            it = st["iter_num"]
            due = it % args.eval_interval == 0 or it == args.max_iters
            if due and it != st["last_eval"]:
                evaluate_and_save()
                if args.patience and st["evals_since_best"] >= args.patience and it < args.max_iters:
                    stopped_early = True
                    print(f"stopping early: no better val loss in {args.patience} evaluations "
                          f"(best {st['best_val_loss']:.4f} at iter {st['best_iter']})")
                    break
            if it >= args.max_iters:
                break
            t0 = time.time()
            for group in opt.param_groups:
                group["lr"] = lr_at(it, args)
            if args.task == "recall":
                x, y = recall_step_batch(args, gen)
            elif args.task == "mqar":
                x, y = mqar_step_batch(args, gen)
            else:
                x, y = get_batch(split["train"], args, gen)
            at = None if args.task == "text" else answers_at(y)
            with ctx:
                _, loss, _ = model(x, targets=y, at=at)
            if not torch.isfinite(loss):
                stop(f"non-finite loss {loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before clipping (no clipping with --grad-clip 0): a long recurrence's gradients show here
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       args.grad_clip if args.grad_clip > 0 else float("inf"))
            if torch.isfinite(grad_norm):
                opt.step()
                bad_grads = 0
            else:  # an overflowed gradient would turn every weight into NaN: skip this update
                bad_grads, st["skipped_updates"] = bad_grads + 1, st["skipped_updates"] + 1
                print(f"iter {it}: gradient norm {grad_norm.item()}, update skipped")
                if bad_grads >= 10:
                    stop("10 non-finite gradients in a row")
            if cuda:
                torch.cuda.synchronize()
            dt = time.time() - t0
            st["iter_num"] = it = it + 1
            if it > 2:  # the first iterations compile kernels: leave them out of throughput
                st["train_tokens"] += x.numel()
                st["train_time"] += dt
            if it % args.log_interval == 0:
                print(f"iter {it}: loss {loss.item():.4f}, grad norm {grad_norm.item():.3g}, "
                      f"lr {lr_at(it - 1, args):.2e}, {dt * 1e3:.1f} ms/iter, {x.numel() / dt:,.0f} tok/s")
    except KeyboardInterrupt as e:
        restore = _quiet_signals()
        save(ckpt_path)
        if st["best_iter"] == st["iter_num"] == st["last_eval"]:  # the copy to best.pt may have been cut short
            atomic_copy(ckpt_path, best_path)
        write_summary()
        print(f"\ninterrupted at iter {st['iter_num']}; saved {ckpt_path} (continue with --resume)")
        restore()
        ended_by(e, previous_sigterm if main_thread else None)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)

    # the end of the run: the best weights, not the last ones
    extra = dict(stopped_early=stopped_early)
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:  # the checkpoints are complete: an interrupt here keeps them and what was evaluated
        if os.path.exists(best_path):
            model.load_state_dict(load_checkpoint(best_path)["model"])
            print(f"loaded the best weights: val loss {st['best_val_loss']:.4f} at iter {st['best_iter']} "
                  f"({best_path})")
        if args.eval_exact and cfg.mixer == "trellis" and cfg.sweeps < cfg.chunk_size - 1:
            # the same weights read by the exact recurrence: how far the chunk-start rule is from it
            exact = TrellisLM(replace(cfg, sweeps=cfg.chunk_size - 1)).to(args.device)
            exact.load_state_dict(model.state_dict())
            extra["val_loss_exact"] = estimate_loss(exact, {"val": split["val"]}, args, ctx)["val"]
            print(f"val loss of the best model under the exact recurrence: {extra['val_loss_exact']:.4f}")
            if args.task != "text":
                extra[f"{args.task}_accuracy_exact"] = task_accuracy(exact, args, ctx, "exact")
            del exact
        if args.eval_exact and cfg.mixer == "trellis":  # and whether the chunk-start rule is stable on these weights
            extra["stability"] = stability_report(model, stability_batch(args, split))
            print_stability(extra["stability"])
        if args.task != "text":
            extra[f"{args.task}_accuracy"] = task_accuracy(model, args, ctx)
        else:
            if args.eval_contexts is not None:
                extra["context_losses"] = context_losses(model, split["val"], args.eval_contexts_list, args, ctx)
                print_context_table(extra["context_losses"])
            if args.sample_tokens > 0:
                model.eval()
                prompt = torch.tensor([prompt_ids], device=args.device)
                with ctx:
                    out = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50)
                extra["sample"] = decode(out[0].tolist())
                print("sample (best weights):\n" + extra["sample"])
    except KeyboardInterrupt as e:
        restore = _quiet_signals()
        write_summary(dict(extra, interrupted_at_end=True))
        print(f"\ninterrupted after training; the checkpoints and {summary_path} are complete")
        restore()
        ended_by(e, previous_sigterm)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous_sigterm)
    summary = write_summary(extra)
    rate = summary["train_tokens_per_s"]  # None: no step after the first two, which compile, was timed
    print(f"done: best val loss {st['best_val_loss']:.4f} at iter {st['best_iter']}, {summary['wall_s']:.1f} s, "
          + (f"{rate:,.0f} train tok/s" if rate else "train tok/s not measured (timed from step 3)"))
    print(f"checkpoints: {ckpt_path} (latest, iter {st['iter_num']}), {best_path} (best); summary: {summary_path}")
    return summary


def eval_from(args):
    """--eval-from CKPT: the val loss of a trained checkpoint at --eval-contexts, no training."""
    if not os.path.isfile(args.eval_from):
        fail(f"error: --eval-from: no checkpoint at {args.eval_from}", code=2)
    ckpt = load_checkpoint(args.eval_from)
    summary_path = os.path.join(os.path.dirname(args.eval_from) or ".", "summary.json")
    summary = read_summary(summary_path)  # before the evaluation: one it could not add to stops the run now
    saved = ckpt["args"]
    if saved.get("task", "text") != "text":
        fail(f"error: {args.eval_from} was trained on --task {saved['task']}; --eval-contexts needs a text model",
             code=2)
    args.tokenizer = saved.get("tokenizer", "gpt2")
    if args.data is None:
        args.data = saved.get("data")
    text, digest = read_text(args)
    if ckpt.get("data_digest", digest) != digest:
        fail(f"error: the text read (sha1 {digest}) is not the one {args.eval_from} was trained on "
             f"(sha1 {ckpt['data_digest']}): pass its --data", code=2)
    encode, _, vocab_size = get_tokenizer(args.tokenizer, text)
    args.block_size = min(args.eval_contexts_list)  # a context longer than the val split is skipped
    split = load_tokens(args, text, digest, encode)
    cfg = TrellisConfig(**dict(ckpt["config"], impl=args.impl))
    model = TrellisLM(cfg).to(args.device)
    load_weights(model, ckpt, args.eval_from)
    losses = context_losses(model, split["val"], args.eval_contexts_list, args, autocast_for(args))
    print(f"{args.eval_from}: {cfg.mixer}, trained at context {saved.get('block_size')}")
    print_context_table(losses)
    summary.setdefault("context_losses_from", {})[os.path.basename(args.eval_from)] = {
        str(T): r for T, r in losses.items()}
    atomic_json(summary, summary_path)
    print(f"written to {summary_path}")
    return losses


# -----------------------------------------------------------------------------
# benchmarks: training throughput, and decoding time vs context


def bench_train(args, steps=10, tokens=32768):
    """Training tokens/s of both mixers at each context (the model's shell, bf16 on CUDA,
    `tokens` per step of random token ids: the data pipeline is left out); on CUDA also Trellis
    with the short convolution's PyTorch form (trellis.ShortConv.use_kernel off), for its A/B."""
    contexts = parse_list("--contexts", args.contexts or "1024,4096,16384")
    ctx = autocast_for(args)
    cuda = args.device.startswith("cuda")
    # (label, mixer, short convolution kernel): on CUDA also the PyTorch convolution, for its A/B
    runs = [("trellis", "trellis", True), ("trellis, torch conv", "trellis", False), ("attention", "attention", True)]
    rows = []
    try:
        for T in contexts:
            for label, mixer, conv_kernel in runs if cuda else runs[::2]:
                args.mixer, trellis.ShortConv.use_kernel = mixer, conv_kernel
                torch.manual_seed(args.seed)
                model = TrellisLM(model_config(args, 50304)).to(args.device)
                opt = make_optimizer(model, args)
                B = max(1, tokens // T)
                x = torch.randint(0, 50304, (B, T), device=args.device)
                times = []
                for i in range(steps + 3):  # 3 warm-up steps (kernel compilation, allocator)
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    with ctx:
                        loss = model(x, targets=x)[1]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= 3:
                        times.append(time.perf_counter() - t0)
                step = float(np.median(times))
                rows.append((T, label, B * T / step))
                print(f"context {T:6d} {label:19s} batch {B:3d}: {step * 1e3:8.1f} ms/step, "
                      f"{B * T / step:12,.0f} tok/s", flush=True)
                del model, opt
    finally:
        trellis.ShortConv.use_kernel = True
    return rows


@torch.no_grad()
def bench_decode(args, steps=16, rounds=8):
    """ms per generated token after a synthetic prompt of each context length. The contexts
    are timed in interleaved rounds, so that drift of the machine (clocks, the host's load)
    does not show up as a trend in context; the median over all rounds is reported. On CUDA
    the Trellis step is also timed as a captured CUDA graph (trellis.DecodeGraph), after
    checking that it produces the eager step's logits."""
    rows = []
    cuda = args.device.startswith("cuda")
    contexts = parse_list("--contexts", args.contexts or "1024,8192,65536")
    for mixer in ("trellis", "trellis+graph", "attention") if cuda else ("trellis", "attention"):
        args.mixer = mixer.split("+")[0]
        torch.manual_seed(args.seed)
        model = TrellisLM(model_config(args, 50304)).to(args.device).eval()
        if cuda:
            model = model.to(torch.bfloat16)
        runs = {}  # context -> [step function, next token, state, step times]
        for T in contexts:
            prompt = torch.randint(0, 50304, (1, T), device=args.device)  # synthetic prompt
            logits, _, state = model(prompt, state=model.initial_state())
            tok = logits[:, -1:].argmax(-1)  # [1,1]
            if mixer == "trellis+graph":
                from trellis import DecodeGraph

                graph, st = DecodeGraph(model, tok, state), state
                rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
                errs, toks, graphed = [], [prompt], []
                for _ in range(4):  # the graph against the eager step: same tokens, same start state
                    logits, _, st = model(tok, state=st)
                    graphed.append(graph.step(tok).clone())
                    errs.append(rel(graphed[-1], logits))
                    toks.append(tok)
                    tok = logits[:, -1:].argmax(-1)
                errs += [rel(graph.state[i][k], st[i][k]) for i in range(len(st)) for k in st[i] if k != "pos"]
                # and against one forward pass over the prompt and the 4 tokens: the function trained
                full = model(torch.cat(toks, 1))[0][:, -4:]
                forward_err = rel(torch.cat(graphed, 1), full)
                print(f"trellis+graph context {T}: max relative difference to the eager step "
                      f"{max(errs):.1e} (logits and state, 4 steps), to the forward {forward_err:.1e} (logits)")
                if not max(errs) <= 1e-2 or not forward_err <= 5e-2:
                    fail(f"DecodeGraph disagrees with the eager step or the forward at context {T}: "
                         f"{max(errs):.3g}, {forward_err:.3g}")
                runs[T] = [lambda tok, state, g=graph: (g.step(tok), None, g.state), tok, graph.state, []]
            else:
                runs[T] = [lambda tok, state: model(tok, state=state), tok, state, []]
        for _ in range(rounds):
            for T, run in runs.items():
                for _ in range(steps):
                    if cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    logits, _, run[2] = run[0](run[1], run[2])
                    run[1] = logits[:, -1:].argmax(-1)
                    if cuda:
                        torch.cuda.synchronize()
                    run[3].append(time.perf_counter() - t0)
        for T, (_, _, state, times) in runs.items():
            nbytes = sum(t.numel() * t.element_size() for layer in state for t in layer.values()
                         if isinstance(t, torch.Tensor))
            ms = 1e3 * np.percentile(times, [10, 50, 90])
            rows.append((mixer, T, float(ms[1]), nbytes, state_numel(state)))
            print(f"{mixer:13s} context {T:6d}: {ms[1]:7.2f} ms/token (p10 {ms[0]:.2f}, p90 {ms[2]:.2f}), "
                  f"state {nbytes / 2**20:8.2f} MiB", flush=True)
        del runs, state, logits
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.bench_decode:
        return bench_decode(args)
    if args.bench_train:
        return bench_train(args)
    if args.eval_from:
        return eval_from(args)
    return train(args)


if __name__ == "__main__":
    main()
