"""Train a tiny Trellis (or attention) language model on tiny Shakespeare.

    python train_tiny.py                          # the default run, one GPU, a few minutes
    python train_tiny.py --device cpu             # a small smoke run on the CPU
    python train_tiny.py --mixer attention        # the softmax-attention baseline
    python train_tiny.py --resume                 # continue from out/ckpt.pt
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
import sys
import time
import urllib.request
from dataclasses import asdict

import numpy as np
import torch

import trellis as tr
from trellis import TrellisConfig, TrellisLM, state_numel

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
HERE = os.path.dirname(os.path.abspath(__file__))

# defaults per device: the GPU run is the real one, the CPU run a smoke test
PRESETS = {
    "cuda": dict(batch_size=16, block_size=256, n_layer=4, n_embd=256, n_head=4, max_iters=1500,
                 eval_interval=250, eval_iters=40, lr=2e-3, warmup_iters=100, dropout=0.1),
    "cpu": dict(batch_size=4, block_size=64, n_layer=2, n_embd=64, n_head=2, max_iters=100,
                eval_interval=50, eval_iters=5, lr=2e-3, warmup_iters=10, dropout=0.0),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    a("--data", default=os.environ.get("TRELLIS_DATA"), help="a local UTF-8 text file (default: download tiny Shakespeare)")
    a("--data-url", default=DATA_URL, help="where tiny Shakespeare is downloaded from")
    a("--cache-dir", default=os.path.join(HERE, "data"), help="downloaded text and token ids go here")
    a("--tokenizer", default="gpt2", choices=["gpt2", "char"], help="GPT-2 BPE (tiktoken r50k_base) or characters")
    a("--out-dir", default="out", help="checkpoint and summary folder")
    a("--resume", action="store_true", help="continue from OUT_DIR/ckpt.pt")
    a("--max-iters", type=int)
    a("--eval-interval", type=int)
    a("--eval-iters", type=int, help="batches per loss estimate")
    a("--log-interval", type=int, default=10)
    a("--batch-size", type=int)
    a("--block-size", type=int, help="context length in tokens")
    a("--n-layer", type=int)
    a("--n-embd", type=int)
    a("--n-head", type=int)
    a("--dropout", type=float)
    a("--lr", type=float, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at lr * this")
    a("--warmup-iters", type=int)
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0)
    a("--seed", type=int, default=1337)
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="autocast dtype (auto: bf16 on CUDA)")
    # the model
    a("--mixer", default="trellis", choices=["trellis", "attention"])
    a("--phi", default="norm_silu", choices=["identity", "silu", "norm_silu"], help="write nonlinearity phi")
    a("--f", default="norm_silu", choices=["norm_silu", "l2_silu"], help="map between the two passes")
    a("--slots", type=int, default=64, help="memory slots m per head")
    a("--chunk-size", type=int, default=64)
    a("--sweeps", type=int, default=0, help="0: the paper's chunk-start rule; chunk_size - 1: exact")
    a("--no-forget-gate", action="store_true", help="ablation: beta = 1")
    a("--gamma-max", type=float, default=0.1, help="inner step size bound: gamma = gamma_max * sigmoid(.)")
    a("--impl", default="auto", choices=["auto", "kernel", "chunked", "loop"], help="operator implementation")
    # the end of the run
    a("--sample-tokens", type=int, default=200, help="tokens generated at the end (0: none)")
    a("--prompt", default="ROMEO:")
    a("--eval-exact", action="store_true",
      help="also report the val loss of the trained model under the exact recurrence (sweeps = chunk_size - 1)")
    a("--bench-decode", action="store_true", help="time generation vs context length instead of training")
    a("--contexts", default="1024,8192,65536", help="contexts for --bench-decode")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device (use --device cpu for a smoke run)")
    for k, v in PRESETS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -----------------------------------------------------------------------------
# data: text -> 90/10 split -> token ids cached as uint16 memmaps


def fail(msg):
    sys.exit(f"train_tiny.py: {msg}")


def read_text(args):
    if args.data:
        if not os.path.isfile(args.data):
            fail(f"--data {args.data}: no such file. Pass a UTF-8 text file, e.g. tiny Shakespeare's input.txt.")
        path = args.data
    else:
        path = os.path.join(args.cache_dir, "tinyshakespeare.txt")
        if not os.path.exists(path):
            print(f"downloading tiny Shakespeare from {args.data_url}")
            try:
                with urllib.request.urlopen(args.data_url, timeout=30) as r:
                    raw = r.read()
            except Exception as e:  # no network, DNS, HTTP error: all need the same advice
                fail(f"could not download {args.data_url} ({e}).\n"
                     "  Offline? Pass a local copy: --data PATH/TO/input.txt (tiny Shakespeare is char-rnn's\n"
                     "  data/tinyshakespeare/input.txt), or put it at " + path)
            os.makedirs(args.cache_dir, exist_ok=True)
            with open(path + ".tmp", "wb") as fh:
                fh.write(raw)
            os.replace(path + ".tmp", path)
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8"), hashlib.sha1(raw).hexdigest()[:12]
    except UnicodeDecodeError as e:
        fail(f"{path} is not UTF-8 text ({e})")


def get_tokenizer(kind, text):
    """(encode, decode, vocab_size)."""
    if kind == "char":
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        return (lambda s: [stoi[c] for c in s if c in stoi]), (lambda ids: "".join(chars[i] for i in ids)), len(chars)
    import tiktoken

    try:
        enc = tiktoken.get_encoding("r50k_base")  # identical to "gpt2", but loads from one file
    except Exception as e:
        fail(f"could not load tiktoken's GPT-2 vocabulary r50k_base ({e}).\n"
             "  Offline? Set TIKTOKEN_CACHE_DIR to a folder holding its ranks file, or use --tokenizer char.")
    return (lambda s: enc.encode_ordinary(s)), enc.decode, 50304  # 50257 padded to a multiple of 64


def load_tokens(args, text, digest, encode):
    """train/val token ids as uint16 memmaps, cached by text digest and tokenizer."""
    folder = os.path.join(args.cache_dir, f"tokens-{digest}-{args.tokenizer}")
    split = {}
    for name in ("train", "val"):
        path = os.path.join(folder, f"{name}.bin")
        if not os.path.exists(path):
            n = int(0.9 * len(text))
            ids = np.array(encode(text[:n] if name == "train" else text[n:]), dtype=np.uint16)
            os.makedirs(folder, exist_ok=True)
            ids.tofile(path + ".tmp")
            os.replace(path + ".tmp", path)
        split[name] = np.memmap(path, dtype=np.uint16, mode="r")
        if len(split[name]) <= args.block_size + 1:
            fail(f"the {name} split has {len(split[name])} tokens, fewer than --block-size {args.block_size} + 2")
    return split


def get_batch(data, args, gen):
    ix = torch.randint(len(data) - args.block_size - 1, (args.batch_size,), generator=gen).tolist()
    x = torch.from_numpy(np.stack([data[i:i + args.block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + args.block_size] for i in ix]).astype(np.int64))
    if args.device.startswith("cuda"):
        return x.pin_memory().to(args.device, non_blocking=True), y.pin_memory().to(args.device, non_blocking=True)
    return x, y


# -----------------------------------------------------------------------------
# model, optimizer, schedule, checkpoints


def model_config(args, vocab_size):
    return TrellisConfig(vocab_size=vocab_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                         mixer=args.mixer, dropout=args.dropout, slots=args.slots, phi=args.phi, f=args.f,
                         chunk_size=args.chunk_size, sweeps=args.sweeps, impl=args.impl,
                         forget_gate=not args.no_forget_gate, gamma_max=args.gamma_max,
                         gamma_init=args.gamma_max / 2)


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


def save_checkpoint(path, model, opt, cfg, args, it, best_val):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), config=asdict(cfg), args=vars(args),
                iter_num=it, best_val_loss=best_val)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)


@torch.no_grad()
def estimate_loss(model, split, args, ctx):
    model.eval()
    gen = torch.Generator().manual_seed(0)  # the same batches at every evaluation
    out = {}
    for name, data in split.items():
        losses = []
        for _ in range(args.eval_iters):
            x, y = get_batch(data, args, gen)
            with ctx:
                losses.append(model(x, targets=y)[1].item())
        out[name] = float(np.mean(losses))
    model.train()
    return out


# -----------------------------------------------------------------------------
# training


def train(args):
    torch.manual_seed(args.seed)
    text, digest = read_text(args)
    encode, decode, vocab_size = get_tokenizer(args.tokenizer, text)
    split = load_tokens(args, text, digest, encode)
    print(f"data: {len(split['train']):,} train and {len(split['val']):,} val tokens ({args.tokenizer})")

    os.makedirs(args.out_dir, exist_ok=True)
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    cfg = model_config(args, vocab_size)
    it, best_val = 0, float("inf")
    if args.resume:
        if not os.path.exists(ckpt_path):
            fail(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=args.device, weights_only=False)
        cfg = TrellisConfig(**ckpt["config"])  # the checkpoint's model, whatever the flags say
        it, best_val = ckpt["iter_num"], ckpt["best_val_loss"]
    model = TrellisLM(cfg).to(args.device)
    opt = make_optimizer(model, args)
    if args.resume:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        print(f"resumed from {ckpt_path} at iter {it} (best val loss {best_val:.4f})")
        del ckpt
    print(f"model: {cfg.mixer}, {model.num_params() / 1e6:.2f}M parameters "
          f"({model.num_params(non_embedding=True) / 1e6:.2f}M without embeddings)")

    cuda = args.device.startswith("cuda")
    dtype = {"auto": torch.bfloat16 if cuda else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    ctx = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else torch.autocast("cpu", enabled=False)
    gen = torch.Generator().manual_seed(args.seed + it)  # a resumed run draws fresh batches
    tokens_per_iter = args.batch_size * args.block_size
    t_start, train_tokens, train_time = time.time(), 0, 0.0
    history = []
    bad_grads = skipped = 0  # consecutive and total updates skipped for a non-finite gradient

    last_eval = it if args.resume else -1  # a resumed run was evaluated when it was saved

    def evaluate_and_save():
        nonlocal best_val, last_eval
        last_eval = it
        losses = estimate_loss(model, split, args, ctx)
        improved = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        history.append(dict(iter=it, **losses))
        print(f"eval {it}: train {losses['train']:.4f}, val {losses['val']:.4f} (best {best_val:.4f})")
        save_checkpoint(ckpt_path, model, opt, cfg, args, it, best_val)  # the latest, for --resume
        if improved:  # the best weights so far, for sampling after the run overfits: a copy, also atomic
            best_path = os.path.join(args.out_dir, "best.pt")
            shutil.copyfile(ckpt_path, best_path + ".tmp")
            os.replace(best_path + ".tmp", best_path)

    model.train()
    try:
        while it < args.max_iters:
            if it % args.eval_interval == 0 and it != last_eval:
                evaluate_and_save()
            t0 = time.time()
            for group in opt.param_groups:
                group["lr"] = lr_at(it, args)
            x, y = get_batch(split["train"], args, gen)
            with ctx:
                _, loss, _ = model(x, targets=y)
            if not torch.isfinite(loss):
                fail(f"non-finite loss {loss.item()} at iter {it}; stopping. The last good checkpoint "
                     f"({ckpt_path}) is untouched: resume from it with a lower --lr.")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before clipping (no clipping with --grad-clip 0): a long recurrence's gradients show here
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                       args.grad_clip if args.grad_clip > 0 else float("inf"))
            if torch.isfinite(grad_norm):
                opt.step()
                bad_grads = 0
            else:  # an overflowed gradient would turn every weight into NaN: skip this update
                bad_grads, skipped = bad_grads + 1, skipped + 1
                print(f"iter {it}: gradient norm {grad_norm.item()}, update skipped")
                if bad_grads >= 10:
                    fail(f"10 non-finite gradients in a row at iter {it}; stopping. The last good checkpoint "
                         f"({ckpt_path}) is untouched: resume from it with a lower --lr.")
            if cuda:
                torch.cuda.synchronize()
            dt = time.time() - t0
            it += 1
            if it > 2:  # the first iterations compile kernels: leave them out of throughput
                train_tokens, train_time = train_tokens + tokens_per_iter, train_time + dt
            if it % args.log_interval == 0:
                print(f"iter {it}: loss {loss.item():.4f}, grad norm {grad_norm.item():.3g}, "
                      f"lr {lr_at(it - 1, args):.2e}, {dt * 1e3:.1f} ms/iter, {tokens_per_iter / dt:,.0f} tok/s")
        if it != last_eval:
            evaluate_and_save()
    except KeyboardInterrupt:
        save_checkpoint(ckpt_path, model, opt, cfg, args, it, best_val)
        print(f"\ninterrupted at iter {it}; saved {ckpt_path} (continue with --resume)")
        sys.exit(130)

    summary = dict(mixer=cfg.mixer, phi=cfg.phi, forget_gate=cfg.forget_gate, sweeps=cfg.sweeps,
                   chunk_size=cfg.chunk_size, block_size=args.block_size, iters=it, best_val_loss=best_val,
                   history=history,
                   wall_s=time.time() - t_start, train_tokens_per_s=train_tokens / max(train_time, 1e-9),
                   skipped_updates=skipped,
                   params=model.num_params(), device=args.device)
    if args.eval_exact and cfg.mixer == "trellis" and cfg.sweeps < cfg.chunk_size - 1:
        # the model was trained with the chunk-start rule; generation uses the exact per-token update
        sweeps = cfg.sweeps
        cfg.sweeps = cfg.chunk_size - 1  # the mixers read their (shared) config at every call
        summary["val_loss_exact"] = estimate_loss(model, {"val": split["val"]}, args, ctx)["val"]
        cfg.sweeps = sweeps
        print(f"val loss of the final model under the exact recurrence: {summary['val_loss_exact']:.4f}")
    if args.sample_tokens > 0:
        model.eval()
        prompt = torch.tensor([encode(args.prompt) or [0]], device=args.device)
        with ctx:
            out = model.generate(prompt, args.sample_tokens, temperature=0.8, top_k=50)
        summary["sample"] = decode(out[0].tolist())
        print("sample:\n" + summary["sample"])
    with open(os.path.join(args.out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"done: best val loss {best_val:.4f}, {summary['wall_s']:.1f} s, "
          f"{summary['train_tokens_per_s']:,.0f} train tok/s")
    return summary


# -----------------------------------------------------------------------------
# decoding benchmark: ms per token and state size vs context


@torch.no_grad()
def bench_decode(args, steps=16, rounds=8):
    """ms per generated token after a synthetic prompt of each context length. The contexts
    are timed in interleaved rounds, so that drift of the machine (clocks, the host's load)
    does not show up as a trend in context; the median over all rounds is reported. On CUDA
    the Trellis step is also timed as a captured CUDA graph (trellis.DecodeGraph), after
    checking that it produces the eager step's logits."""
    rows = []
    cuda = args.device.startswith("cuda")
    contexts = [int(c) for c in args.contexts.split(",")]
    for mixer in ("trellis", "trellis+graph", "attention") if cuda else ("trellis", "attention"):
        args.mixer = mixer.split("+")[0]
        torch.manual_seed(args.seed)
        model = TrellisLM(model_config(args, 50304)).to(args.device).eval()
        if cuda:
            model = model.to(torch.bfloat16)
        runs = {}  # context -> [step function, next token, state, step times]
        for T in contexts:
            prompt = torch.randint(0, 50304, (1, T), device=args.device)  # synthetic prompt
            logits, _, state = model(prompt)
            tok = logits[:, -1:].argmax(-1)  # [1,1]
            if mixer == "trellis+graph":
                graph, st = tr.DecodeGraph(model, tok, state), state
                rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
                errs = []
                for _ in range(4):  # the graph against the eager step: same tokens, same start state
                    logits, _, st = model(tok, state=st)
                    errs.append(rel(graph.step(tok), logits))
                    tok = logits[:, -1:].argmax(-1)
                errs += [rel(graph.state[i][k], st[i][k]) for i in range(len(st)) for k in st[i]]
                print(f"trellis+graph context {T}: max relative difference to the eager step "
                      f"{max(errs):.1e} (logits and state, 4 steps)")
                if not max(errs) <= 1e-2:
                    fail(f"DecodeGraph disagrees with the eager step at context {T}: {max(errs):.3g}")
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
            nbytes = sum(t.numel() * t.element_size() for layer in state for t in layer.values())
            ms = 1e3 * np.percentile(times, [10, 50, 90])
            rows.append((mixer, T, float(ms[1]), nbytes, state_numel(state)))
            print(f"{mixer:13s} context {T:6d}: {ms[1]:7.2f} ms/token (p10 {ms[0]:.2f}, p90 {ms[2]:.2f}), "
                  f"state {nbytes / 2**20:8.2f} MiB", flush=True)
        del runs, state, logits
    return rows


if __name__ == "__main__":
    args = parse_args()
    if args.bench_decode:
        bench_decode(args)
    else:
        train(args)
