"""Command line: `python -m lora_pass inspect ...` (also the `lora-pass` console script)."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a float in (0, 1), got {value}")
    return value


def _lora_targets(text: str) -> str:
    from .models import parse_lora_targets

    try:
        parse_lora_targets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from .models import OPT_ARCHS

    parser = argparse.ArgumentParser(prog="lora-pass", description="Tools of the lowrank_lora torch.compile backend.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "inspect",
        help="compile a LoRA model with lowrank_lora, run one step, print and save the report",
        description="Build a model from its published config (random weights, or --weights PATH), apply PEFT "
        "LoRA, compile it with backend='lowrank_lora', run one forward and backward step on random tokens, "
        "print the report of rewritten and skipped attention sites, and save it to --out.",
    )
    p.add_argument("--model", default="opt-125m", choices=sorted(OPT_ARCHS),
                   help="architecture to build from its config (default: opt-125m)")
    p.add_argument("--weights", metavar="PATH", default=None,
                   help="local directory of a Hugging Face OPT checkpoint to load instead of random weights")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences per batch (default: 1)")
    p.add_argument("--lora", type=_lora_targets, default="q,v",
                   help="comma-separated LoRA targets among q, k, v, o (default: q,v)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default: 8)")
    p.add_argument("--alpha", type=_positive_int, default=16, help="LoRA alpha (default: 16)")
    p.add_argument("--attn", choices=["sdpa", "eager", "softmax1"], default="sdpa",
                   help="attention implementation: Hugging Face's sdpa or eager, or softmax1 for the "
                        "outlier-free OPT (softmax_1 attention) (default: sdpa)")
    p.add_argument("--mode", choices=["auto", "exact", "lowrank"], default="auto", help="backend mode (default: auto)")
    p.add_argument("--tolerance", type=_tolerance, default=0.05, help="backend tolerance (default: 0.05)")
    p.add_argument("--degree", type=_positive_int, default=2, help="Taylor degree (default: 2)")
    p.add_argument("--crossover", type=int, default=None,
                   help="sequence length from which auto mode compiles the guarded path (default: cost model)")
    p.add_argument("--no-backward", action="store_true", help="run the forward only")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default: 0)")
    p.add_argument("--out", metavar="DIR", default=None, help="directory to save the report to")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.crossover is not None and args.crossover < 0:
        parser.error(f"argument --crossover: expected an integer >= 0, got {args.crossover}")
    if args.degree > 6:
        parser.error(f"argument --degree: expected 1 to 6, got {args.degree}")
    try:
        import peft  # noqa: F401
    except ImportError:
        parser.error("PEFT is required: pip install 'lora-pass[peft]'")

    import torch

    import lora_pass
    from .models import build_opt_lora

    model = build_opt_lora(args.model, lora=args.lora, r=args.rank, alpha=args.alpha, attn=args.attn,
                           max_positions=max(2048, args.seq_len + 2), weights=args.weights, seed=args.seed)
    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    options = {"mode": args.mode, "tolerance": args.tolerance, "degree": args.degree, "crossover": args.crossover}
    report = lora_pass.inspect(model, input_ids=ids, labels=ids, use_cache=False, options=options,
                               backward=not args.no_backward)
    print(report)
    if args.out:
        print(f"\nsaved to {report.save(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
