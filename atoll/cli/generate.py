"""``atoll generate RUN --prompt TEXT``: continue a prompt with a finished run's model.

A dense run's ``model/`` is one Hugging Face model; a grid of paths' holds every path and
the router, and the prompt runs through the path its first tokens route to (as training
documents did), which is printed first.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_generate(args: argparse.Namespace) -> int:
    """Print the continuation of ``args.prompt`` (a grid: and the path it took)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from atoll.app.paths_export import INDEX, load_for_prompt
    from atoll.model import generate_sample
    from atoll.paths.grid import path_name

    hf_logging.disable_progress_bar()  # a line of loading bars before one line of text
    model_dir = Path(args.run_dir) / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} does not exist: is {args.run_dir} a finished run?")
    if (model_dir / INDEX).exists():
        model, tokenizer, path = load_for_prompt(model_dir, args.prompt)
        print(f"path {path_name(path)}")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = generate_sample(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                           seed=args.seed)
    print(args.prompt + text)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``generate`` to the command line."""
    g = sub.add_parser("generate", help="continue a prompt with a finished run's model (a "
                                        "grid: through the path the prompt routes to)")
    g.add_argument("run_dir", help="a finished run folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=120)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
