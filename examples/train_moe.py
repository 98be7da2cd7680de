"""Train a small Mixture-of-Experts language model on CPU with moerail's router and dispatch ops.

A byte-level GPT (default: 4 layers, d_model 128) whose feed-forward blocks are MoE layers
(default: 16 experts, top-2), trained on Python's own standard-library source, which every Python
installation carries, so nothing is downloaded. Each MoE layer does, per step::

    logits = router(x)                                          # [T, E]
    probs, routing_map = moerail.topk_route(logits, k)          # [T, E] each
    permuted, permuted_probs, sorted_indices, _, tokens_per_expert = moerail.permute(x, routing_map, probs)
    y = expert MLPs over the tokens_per_expert splits * permuted_probs
    out = moerail.unpermute(y, sorted_indices, x.shape)         # combine, back in token order

plus the switch load-balancing loss and the router z-loss, or (``--balance bias``) a sigmoid router
with DeepSeek-V3's aux-loss-free expert bias updated by ``moerail.expert_bias_update``.

Run: ``python examples/train_moe.py`` (``make demo``); ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import random
import sys
import sysconfig
import time
from typing import List, Optional, Tuple

# OpenMP threads that spin while waiting take the cores from the threads doing the work when the
# machine is shared: torch steps run up to 10x slower. Waiting passively costs nothing on an idle
# machine. Set before torch loads OpenMP; an OMP_WAIT_POLICY from the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import moerail  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in requirements-dev.txt; keep the example runnable without it
    tqdm = None

VOCAB = 256  # bytes


# ----------------------------------------------------------------------------------------------
# Data: the standard library's own source, as bytes
# ----------------------------------------------------------------------------------------------


def load_corpus(max_bytes: int) -> Tuple[bytes, str]:
    """Python source files from the standard library (sorted, so the corpus is the same every run),
    or, where an installation ships no sources, the docstrings of the standard modules."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for path in sorted(stdlib.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size >= 100_000:
        return b"".join(chunks)[:max_bytes], f"{len(chunks)} standard-library source files in {stdlib}"

    import importlib
    import inspect

    docs = []
    for name in sorted(set(sys.stdlib_module_names) if hasattr(sys, "stdlib_module_names") else sys.builtin_module_names):
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some modules only import on some platforms
            continue
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc:
                docs.append(doc)
    return "\n\n".join(docs).encode()[:max_bytes], "docstrings of the standard-library modules"


class Batches:
    """Random windows of ``seq_len + 1`` bytes from one split."""

    def __init__(self, data: bytes, seq_len: int, batch_size: int, seed: int):
        self.data = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        self.seq_len, self.batch_size = seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> Tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        windows = torch.stack([self.data[s : s + self.seq_len + 1] for s in starts.tolist()])
        return windows[:, :-1], windows[:, 1:]


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class MoE(nn.Module):
    """A MoE feed-forward block: router -> moerail.topk_route -> moerail.permute -> expert MLPs ->
    weight by the router probs -> moerail.unpermute."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        d, f, e = args.d_model, args.d_ffn, args.experts
        self.num_experts, self.topk = e, args.topk
        self.balance = args.balance
        self.score_function = "sigmoid" if args.balance == "bias" else "softmax"
        self.capacity_factor = args.capacity_factor
        self.aux_coeff, self.z_coeff = args.aux_loss_coeff, args.z_loss_coeff
        self.router = nn.Linear(d, e, bias=False)
        self.w1 = nn.Parameter(torch.randn(e, d, f) * 0.02)  # expert e: gelu(x @ w1[e]) @ w2[e]
        self.w2 = nn.Parameter(torch.randn(e, f, d) * 0.02 / math.sqrt(2 * args.layers))
        # Aux-loss-free balancing: added to the scores for selection only, updated after each step.
        self.register_buffer("expert_bias", torch.zeros(e))
        self.tokens_per_expert = torch.zeros(e, dtype=torch.int64)  # counted over the current step

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, d]
        num_tokens = x.shape[0]
        logits = self.router(x)  # [T, E]

        probs, routing_map = moerail.topk_route(
            logits,
            self.topk,
            score_function=self.score_function,
            expert_bias=self.expert_bias if self.balance == "bias" else None,
        )
        if self.capacity_factor:
            probs, routing_map = moerail.apply_token_dropping(probs, routing_map, self.topk, self.capacity_factor)

        # Group the token copies by expert; tokens_per_expert gives each expert's rows.
        permuted, permuted_probs, sorted_indices, _, tokens_per_expert = moerail.permute(x, routing_map, probs)
        outputs = []
        for e, rows in enumerate(torch.split(permuted, tokens_per_expert.tolist())):
            outputs.append(F.gelu(rows @ self.w1[e]) @ self.w2[e] if rows.shape[0] else rows)
        y = torch.cat(outputs) * permuted_probs.unsqueeze(-1)
        out = moerail.unpermute(y, sorted_indices, x.shape)  # sums each token's k expert outputs
        if self.training:
            self.tokens_per_expert += tokens_per_expert.detach()

        # Router losses: switch load balancing (on the unbiased scores, as Megatron-Core does) and z-loss.
        aux = moerail.z_loss(logits, self.z_coeff)
        if self.balance == "aux":
            _, scores, counts = moerail.routing_scores_for_aux_loss(
                logits, self.topk, self.score_function, return_tokens_per_expert=True
            )
            aux = aux + moerail.switch_load_balancing_loss(
                scores, counts, num_tokens, self.topk, self.num_experts, self.aux_coeff
            )
        return out.reshape(shape), aux


class Block(nn.Module):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.n_heads = args.heads
        self.ln1, self.ln2 = nn.LayerNorm(args.d_model), nn.LayerNorm(args.d_model)
        self.qkv = nn.Linear(args.d_model, 3 * args.d_model)
        self.proj = nn.Linear(args.d_model, args.d_model)
        self.moe = MoE(args)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.n_heads, d // self.n_heads).transpose(1, 3).unbind(2)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        y, aux = self.moe(self.ln2(x))
        return x + y, aux


class MoEGPT(nn.Module):
    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, args.d_model)
        self.pos = nn.Embedding(args.seq_len, args.d_model)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.layers))
        self.ln_f = nn.LayerNorm(args.d_model)
        for m in self.modules():  # GPT-2 initialisation; residual projections scaled by depth
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for b in self.blocks:
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * args.layers))

    def forward(self, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        aux = x.new_zeros(())
        for block in self.blocks:
            x, a = block(x)
            aux = aux + a
        return self.ln_f(x) @ self.tok.weight.T, aux  # output head tied to the embedding

    def moe_layers(self) -> List[MoE]:
        return [b.moe for b in self.blocks]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ffn", type=int, default=256, help="hidden size of each expert's MLP")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--balance", choices=("aux", "bias"), default="aux",
                    help="aux: softmax router + switch load-balancing loss; bias: sigmoid router + aux-loss-free expert bias")
    ap.add_argument("--aux-loss-coeff", type=float, default=1e-2)
    ap.add_argument("--z-loss-coeff", type=float, default=1e-3)
    ap.add_argument("--bias-update-rate", type=float, default=1e-2,
                    help="expert-bias step per training step (--balance bias; DeepSeek-V3 uses 1e-3 over far more steps)")
    ap.add_argument("--capacity-factor", type=float, default=None, help="drop tokens beyond this capacity (default: dropless)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--data-bytes", type=int, default=4_000_000, help="bytes of standard-library source to use")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--sample-bytes", type=int, default=200, help="bytes to generate at the end (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.d_model % args.heads:
        ap.error("--d-model must be a multiple of --heads")
    if not 1 <= args.topk <= args.experts:
        ap.error("--topk must be between 1 and --experts")
    return args


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: MoEGPT, batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean loss over a fixed set of validation batches (the same at every evaluation)."""
    model.eval()
    losses = []
    for x, y in batches:
        logits, _ = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1)).item())
    model.train()
    return sum(losses) / len(losses)


def load_report(counts: torch.Tensor) -> str:
    """max/mean and min/mean of the tokens each expert received, per layer."""
    mean = counts.float().mean(dim=1).clamp(min=1e-9)
    return "  ".join(
        f"L{i} {float(c.max()) / float(m):.2f}/{float(c.min()) / float(m):.2f}" for i, (c, m) in enumerate(zip(counts, mean))
    )


@torch.no_grad()
def sample(model: MoEGPT, prompt: bytes, n: int, seq_len: int, gen: torch.Generator) -> bytes:
    model.eval()
    idx = torch.tensor([list(prompt)])
    for _ in range(n):
        logits, _ = model(idx[:, -seq_len:])
        probs = torch.softmax(logits[0, -1] / 0.8, dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=gen)[None]], dim=1)
    model.train()
    return bytes(idx[0].tolist())


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    corpus, source = load_corpus(args.data_bytes)
    split = int(0.9 * len(corpus))
    train = Batches(corpus[:split], args.seq_len, args.batch_size, args.seed)
    val_data = Batches(corpus[split:], args.seq_len, args.batch_size, args.seed + 1)
    val = [val_data.next() for _ in range(args.eval_batches)]
    model = MoEGPT(args)
    moe = model.moe_layers()
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(m.w1.numel() + m.w2.numel() for m in moe)
    n_active = n_params - n_expert + n_expert * args.topk // args.experts
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    tokens_per_step = args.batch_size * args.seq_len
    balance = ("switch aux loss" if args.balance == "aux" else "aux-loss-free expert bias") + " + z-loss"
    print(f"moerail {moerail.__version__}, torch {torch.__version__}; {torch.get_num_threads()} torch threads, "
          f"{moerail.get_num_threads()} moerail threads")
    print(f"data: {len(corpus) / 1e6:.1f} MB of bytes ({source}); {split / 1e6:.1f} MB train / {(len(corpus) - split) / 1e6:.1f} MB validation")
    print(f"model: {args.layers} layers, d_model {args.d_model}, {args.experts} experts x d_ffn {args.d_ffn}, top-{args.topk}, "
          f"{balance}; {n_params / 1e6:.2f}M parameters ({n_active / 1e6:.2f}M active per token)")
    print(f"training: {args.steps} steps x {tokens_per_step} tokens (batch {args.batch_size} x {args.seq_len}), "
          f"AdamW lr {args.lr}, seed {args.seed}")

    val_start = evaluate(model, val)
    print(f"step 0: validation loss {val_start:.3f} (uniform over bytes: ln 256 = {math.log(VOCAB):.3f})")

    interval_load = torch.zeros(args.layers, args.experts, dtype=torch.int64)
    total_load = torch.zeros_like(interval_load)
    losses: List[float] = []
    train_time, timed_tokens = 0.0, 0
    t_start = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="train", unit="step", dynamic_ncols=True) if tqdm else range(1, args.steps + 1)
    write = tqdm.write if tqdm else print
    for step in bar:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args)
        x, y = train.next()
        logits, aux = model(x)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        counts = torch.stack([m.tokens_per_expert for m in moe])  # [layers, experts], this step
        for m in moe:
            m.tokens_per_expert.zero_()
        if args.balance == "bias":
            biases = torch.stack([m.expert_bias for m in moe])
            biases = moerail.expert_bias_update(counts, biases, args.bias_update_rate)
            for m, b in zip(moe, biases):
                m.expert_bias.copy_(b)
        interval_load += counts
        total_load += counts

        dt = time.perf_counter() - t0
        if step > 3:  # the first steps warm up allocators and thread pools
            train_time += dt
            timed_tokens += tokens_per_step
        losses.append(loss.item())
        tok_s = timed_tokens / train_time if train_time else tokens_per_step / dt
        if tqdm:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{aux.item():.4f}", tok_s=f"{tok_s:,.0f}")
        if step % args.log_every == 0 or step == args.steps:
            recent = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
            val_loss = evaluate(model, val)
            write(f"step {step:4d}: train loss {recent:.3f}  val loss {val_loss:.3f}  aux {aux.item():.4f}  "
                  f"{tok_s:,.0f} tok/s  expert load max/mean, min/mean: {load_report(interval_load)}")
            interval_load.zero_()
    if tqdm:
        bar.close()
    wall = time.perf_counter() - t_start

    print("\ntokens per expert over the run (each token counts once per expert it is routed to):")
    width = max(len(str(int(total_load.max()))), 5)
    print("layer  " + " ".join(f"{f'e{e}':>{width}}" for e in range(args.experts)) + "   max/mean")
    for i, row in enumerate(total_load):
        print(f"L{i:<5} " + " ".join(f"{int(c):>{width}}" for c in row) + f"   {float(row.max()) / float(row.float().mean()):.2f}")

    if args.sample_bytes:
        text = sample(model, b"def ", args.sample_bytes, args.seq_len, torch.Generator().manual_seed(args.seed))
        print("\nsample (temperature 0.8, prompt 'def '):\n" + text.decode("utf-8", errors="replace"))

    first = sum(losses[:10]) / len(losses[:10])
    last = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
    val_end = evaluate(model, val)
    print("\nsummary")
    print(f"  steps            {args.steps} ({args.steps * tokens_per_step:,} tokens) in {wall:.0f} s")
    print(f"  train loss       {first:.3f} (first 10 steps) -> {last:.3f} (last {min(args.log_every, args.steps)} steps)")
    print(f"  validation loss  {val_start:.3f} -> {val_end:.3f} ({val_end / math.log(2):.2f} bits per byte)")
    print(f"  throughput       {timed_tokens / max(train_time, 1e-9):,.0f} tokens/s (training steps, excluding evaluation)")
    print("  expert load      max/mean per layer over the run: "
          + ", ".join(f"L{i} {float(r.max()) / float(r.float().mean()):.2f}" for i, r in enumerate(total_load)))


if __name__ == "__main__":
    main()
