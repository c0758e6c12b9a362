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
        description="Build an OPT model from its published config with random weights (--model), or load a "
        "local checkpoint of any supported family (--weights), apply PEFT LoRA, compile it with "
        "backend='lowrank_lora', run one forward and backward step, and print the report: rewritten and "
        "skipped attention sites, and the logit bound R per layer and head against R_max with the smallest "
        "tolerance and degree under which each layer passes. --out saves it, --plot draws it.",
    )
    p.add_argument("--model", default=None, choices=sorted(OPT_ARCHS),
                   help="OPT architecture to build from its config with random weights (default: opt-125m; "
                        "not with --weights)")
    p.add_argument("--weights", metavar="PATH", default=None,
                   help="local Hugging Face checkpoint: a directory saved with save_pretrained, of family "
                        "OPT, LLaMA, Mistral, Qwen2, GPT-2, BERT or RoBERTa, or a .gguf file (LLaMA, Mistral, "
                        "Qwen2, GPT-2; needs the gguf package)")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="feed this text file through the checkpoint's own tokenizer (with --weights, when the "
                        "checkpoint has a tokenizer; random tokens otherwise, and the report says which)")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw R per layer and head against R_max (log scale), with lora_share, to this PNG file")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default: 512)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences per batch (default: 1)")
    p.add_argument("--lora", type=_lora_targets, default="q,v",
                   help="comma-separated LoRA targets among q, k, v, o, mapped to the family's module names "
                        "(q_proj, query, GPT-2's fused c_attn, ...) (default: q,v)")
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

    if args.weights and args.model:
        parser.error("argument --model: builds random weights; with --weights the family comes from the checkpoint")
    if args.text and not args.weights:
        parser.error("argument --text: needs --weights (a checkpoint with its tokenizer)")
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"argument --plot: expected a .png file name, got {args.plot!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("argument --plot: needs matplotlib: pip install 'lora-pass[plot]'")
    text = None
    if args.text:
        try:
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"argument --text: cannot read {args.text!r}: {exc}")

    import torch

    import lora_pass

    if args.weights:
        from .checkpoints import checkpoint_inputs, load_lora_checkpoint

        try:
            model, info = load_lora_checkpoint(args.weights, lora=args.lora, r=args.rank, alpha=args.alpha,
                                               attn=args.attn, seed=args.seed)
            inputs, source = checkpoint_inputs(info, batch=args.batch, seq_len=args.seq_len, text=text,
                                               seed=args.seed)
        except (ValueError, ImportError, OSError) as exc:
            parser.error(f"argument --weights: {exc}")
        print(f"{info.path}: family {info.family}, {info.model_class}, LoRA on {', '.join(info.targets)}; "
              f"inputs: {source}")
    else:
        from .models import build_opt_lora

        model = build_opt_lora(args.model or "opt-125m", lora=args.lora, r=args.rank, alpha=args.alpha,
                               attn=args.attn, max_positions=max(2048, args.seq_len + 2), seed=args.seed)
        vocab = model.get_base_model().config.vocab_size
        ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
        inputs, source = {"input_ids": ids, "labels": ids, "use_cache": False}, "random tokens"
    options = {"mode": args.mode, "tolerance": args.tolerance, "degree": args.degree, "crossover": args.crossover}
    report = lora_pass.inspect(model, options=options, backward=not args.no_backward, **inputs)
    report.inputs = source
    print(report)
    if args.out:
        print(f"\nsaved to {report.save(args.out)}")
    if args.plot:
        print(f"plot: {report.plot(args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
