"""Quickstart: LoRA fine-tuning of a small OPT through the `lowrank_lora` torch.compile backend.

    python examples/quickstart.py                     # random-weight OPT, about a minute on 2 CPU cores
    python examples/quickstart.py --attn eager        # the explicit matmul-softmax-matmul pattern
    python examples/quickstart.py --attn softmax1     # outlier-free OPT: softmax_1 attention
    python examples/quickstart.py --mode exact        # every site compiled exact
    python examples/quickstart.py --weights PATH      # a local OPT checkpoint instead of random weights

It builds an OPT from `OPTConfig`, adds PEFT LoRA (r=8, alpha=16) on q_proj and v_proj, compiles
it with `torch.compile(model, backend="lowrank_lora", options={...})`, runs a few AdamW steps on
random tokens and prints what the backend did at every attention site (`lora_pass.telemetry()`).

The low-rank path is taken only where the norm guard R <= R_max holds, i.e. where the attention
logits are small. Randomly initialised weights are close to that regime, pretrained weights are
not. To show both paths, `--bounded` shrinks the q_proj/k_proj base weights of every layer but
the last, so those layers pass the guard and the last one runs exactly. `crossover` defaults to 0
here: the cost model alone would keep a sequence this short on the exact path.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from tabulate import tabulate
from tqdm import tqdm

import lora_pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", metavar="PATH", help="local OPT checkpoint (OPTForCausalLM.from_pretrained); default: random weights")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "softmax1"],
                   help="attn_implementation (default: sdpa); softmax1: outlier-free OPT, softmax_1 attention")
    p.add_argument("--layers", type=int, default=3, help="decoder layers of the random model (default: 3)")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the random model (default: 128)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the random model (default: 4)")
    p.add_argument("--seq", type=int, default=128, help="sequence length (default: 128)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default: 4)")
    p.add_argument("--steps", type=int, default=8, help="AdamW steps (default: 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--mode", default="auto", choices=["auto", "exact", "lowrank"], help="backend option mode (default: auto)")
    p.add_argument("--tolerance", type=float, default=0.05, help="backend option tolerance (default: 0.05)")
    p.add_argument("--degree", type=int, default=2, help="backend option degree (default: 2)")
    p.add_argument("--crossover", default="0",
                   help='backend option crossover: an int, or "model" for the built-in cost model (default: 0)')
    p.add_argument("--bounded", type=float, default=None, metavar="FACTOR",
                   help="multiply the q_proj/k_proj base weights and biases of all layers but the last by FACTOR "
                        "(default: 0.25 with random weights, 1 = unchanged with --weights)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.crossover = None if args.crossover == "model" else int(args.crossover)
    if args.bounded is None:
        args.bounded = 1.0 if args.weights else 0.25
    return args


def build_model(args):
    from peft import LoraConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(args.seed)
    if args.attn == "softmax1":
        from lora_pass.softmax_one import register_attention

        register_attention()
    if args.weights:
        # dropout off: attention dropout in training would leave every site untouched (see README)
        model = OPTForCausalLM.from_pretrained(args.weights, attn_implementation=args.attn, dtype=torch.float32,
                                               dropout=0.0, attention_dropout=0.0)
    else:
        cfg = OPTConfig(
            vocab_size=1024, hidden_size=args.hidden, num_hidden_layers=args.layers, ffn_dim=4 * args.hidden,
            num_attention_heads=args.heads, max_position_embeddings=max(args.seq, 64),
            word_embed_proj_dim=args.hidden, dropout=0.0, attention_dropout=0.0,
            attn_implementation=args.attn,
        )
        model = OPTForCausalLM(cfg)
    layers = model.model.decoder.layers
    if args.bounded != 1.0:
        with torch.no_grad():
            for layer in layers[:-1]:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(args.bounded)
                    if proj.bias is not None:
                        proj.bias.mul_(args.bounded)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, lora)


def short(module: str) -> str:
    """'base_model.model.model.decoder.layers.0.self_attn' -> 'layers.0.self_attn'."""
    i = module.find("layers.")
    return module[i:] if i >= 0 else module


def site_table():
    rows = []
    for site, stats in lora_pass.telemetry():
        adapted = ",".join(n.upper() for n in "qkv" if site.projections[n].adapted) or "-"
        heads = f"{site.heads}" if site.heads == site.kv_heads else f"{site.heads}/{site.kv_heads}"
        if stats is None:
            last, fwd, bwd = "-", "-", "-"
        else:
            last = "-" if stats["last_bound"] != stats["last_bound"] else f"{stats['last_bound']:.3f}"
            fwd = f"{int(stats['forward_lowrank'])}/{int(stats['forward_exact'])}"
            bwd = f"{int(stats['backward_lowrank'])}/{int(stats['backward_exact'])}"
        rows.append([short(site.module), site.family, adapted, heads, site.head_dim, site.seq_len,
                     f"{site.r_max:.3f}", last, fwd, bwd, f"{site.paths}: {site.decision}"])
    headers = ["module", "family", "LoRA", "heads", "head dim", "L", "R_max", "last R",
               "fwd low-rank/exact", "bwd low-rank/exact", "compiled: decision"]
    return tabulate(rows, headers=headers)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    model = build_model(args)
    model.train()
    vocab = model.config.vocab_size
    options = {"mode": args.mode, "tolerance": args.tolerance, "degree": args.degree, "crossover": args.crossover}
    compiled = torch.compile(model, backend="lowrank_lora", options=options)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    gen = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]
    with torch.no_grad():
        eager_logits = model(input_ids=batches[0], use_cache=False).logits

    print(f"OPT: {model.config.num_hidden_layers} layers, hidden {model.config.hidden_size}, "
          f"{model.config.num_attention_heads} heads, attn_implementation={args.attn!r}; "
          f"LoRA r=8 alpha=16 on q_proj, v_proj; batch {args.batch} x {args.seq} tokens")
    print(f"backend options: {options}")
    times, losses = [], []
    bar = tqdm(batches, desc="train", unit="step")
    for step, ids in enumerate(bar):
        t0 = time.perf_counter()
        out = compiled(input_ids=ids, labels=ids, use_cache=False)
        loss = out.loss
        if step == 0:
            logit_diff = (out.logits.detach() - eager_logits).abs().max().item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()

    print(f"\nstep 1 (compiles forward and backward): {times[0]:.1f} s; "
          + (f"later steps: {sum(times[1:]) / len(times[1:]) * 1e3:.0f} ms each" if len(times) > 1 else ""))
    print(f"step 1: max |logit difference| compiled vs eager {logit_diff:.1e} (max |logit| {eager_logits.abs().max().item():.2f})")
    print("\nRewritten attention sites (lora_pass.telemetry()):\n")
    print(site_table())
    skipped = [s for r in lora_pass.records() for s in r.skipped]
    for s in skipped:
        print(f"skipped {short(s.module)} ({s.family}): {s.reason}")
    r_max = lora_pass.Options(tolerance=args.tolerance, degree=args.degree).r_max
    print(f"""
How to read it: "last R" is the logit bound R = scale * max||q|| * max||k - mu|| of the last call.
A "guarded" site runs the low-rank path (forward and backward) when R <= R_max = {r_max:.3f}
(tolerance {args.tolerance}, degree {args.degree}; see docs/guard.md), and the exact fused SDPA
kernels otherwise. An "exact" site was compiled as plain SDPA (only its forwards are counted).""")
    if args.bounded != 1.0:
        print(f"""--bounded {args.bounded} scaled the q/k projections of all layers but the last, so that those
layers pass the guard and the last one does not.""")
    print("""Real pretrained models usually have large attention logits (R of 10 to 100): they fail the
guard and run exactly, at the cost of plain Inductor. The low-rank path pays off only for long
sequences (thousands of tokens) with bounded logits.""")
    if args.crossover == 0:
        print("This demo sets crossover=0 so that the guarded path is compiled in even for a short sequence.")


if __name__ == "__main__":
    main()
