"""The exported model's card: ``model/README.md`` in the Hugging Face format.

It says what a person publishing the model must be able to say: the architecture, the tokens
it was trained on, which sites and domains they came from and for what purpose the data was
consented, each contributor's share, the ledger head that proves those shares (and the
digest of these very weights, recorded in the ledger's last round), and the validation losses
against the centralised baselines.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from atoll.app.metrics import FEDERATION, mean_loss, read_metrics

CARD = "README.md"


def model_card(run_dir: Path, model_dir: Path) -> str:
    """The card's text for the model exported from ``run_dir`` into ``model_dir``."""
    records = read_metrics(run_dir / "metrics.jsonl")
    info = _json(run_dir / "run.json")
    arch = _json(model_dir / "config.json")
    run_cfg = _run_config(run_dir)
    rounds = [r for r in records if r["kind"] == "round" and r["run"] == FEDERATION]
    tokens = rounds[-1]["tokens"] if rounds else 0
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- atoll", "- federated-learning", "- diloco", "---", ""]
    body = [
        f"# {info.get('name', run_dir.name)}",
        "",
        f"A causal language model trained by federated training with atoll (run "
        f"`{info.get('run_id', '?')}`): {len(rounds) - 1 if rounds else 0} rounds, "
        f"{tokens:,} tokens. The data never left the sites that hold it; each round the "
        f"sites trained locally and sent only compressed changes to the weights.",
        "",
        "## Architecture",
        "",
        f"{arch.get('model_type', '?')}: {arch.get('num_hidden_layers', '?')} layers, hidden "
        f"size {arch.get('hidden_size', '?')}, {arch.get('num_attention_heads', '?')} attention "
        f"heads, vocabulary {arch.get('vocab_size', '?')}, context "
        f"{arch.get('max_position_embeddings', '?')} tokens.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
        "## Data, sites and consent",
        "",
        f"Purpose the run trained for: **{run_cfg.get('purpose', 'pretraining')}**; every site "
        f"trained only on contributions whose consent allows it, and re-checked consent every "
        f"round (withdrawn contributions stop being read).",
        "",
        *_sites(run_cfg, records),
        "",
        *_shares(run_dir),
        "",
        "## Validation loss (nats/token)",
        "",
        *_losses(records),
    ]
    return "\n".join(front + body) + "\n"


def write_model_card(run_dir: str | Path, model_dir: str | Path) -> Path:
    """Write ``model_dir/README.md`` for the run in ``run_dir``; returns its path."""
    from atoll.util.atomic import write_atomic

    path = Path(model_dir) / CARD
    write_atomic(path, model_card(Path(run_dir), Path(model_dir)).encode())
    return path


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.toml"
    return tomllib.loads(path.read_text()) if path.exists() else {}


def _sites(run_cfg: dict[str, Any], records: list[dict]) -> list[str]:
    """A row per site: the data it trained on and the tokens of its accepted updates."""
    tokens: dict[str, int] = {}
    for r in records:
        if r["kind"] == "site" and r.get("accepted"):
            tokens[r["site"]] = tokens.get(r["site"], 0) + r.get("tokens", 0)
    rows = ["| site | data | tokens trained |", "|---|---|---|"]
    for s in run_cfg.get("sites") or [{"name": n} for n in sorted(tokens)]:
        data = Path(str(s.get("data", ""))).name or "(on the site's machine)"
        rows.append(f"| {s['name']} | {data} | {tokens.get(s['name'], 0):,} |")
    return rows


def _shares(run_dir: Path) -> list[str]:
    """The contributors' shares and the ledger head that proves them."""
    from atoll.app.books import LEDGER
    from atoll.ledger.chain import verify_ledger
    from atoll.ledger.credit import shares

    path = run_dir / LEDGER
    if not path.exists():
        return ["No contribution ledger in the run folder."]
    verdict = verify_ledger(path)
    if not verdict.ok:
        return [f"**The run's ledger does not verify**: {verdict}"]
    head = verdict.read[-1]
    rounds = [e for e in verdict.read if e.kind == "round"]
    digest = rounds[-1].body.get("model_sha256", "?") if rounds else "?"
    rows = ["## Contributors", "", "| contributor | sites | tokens | share |", "|---|---|---|---|"]
    rows += [f"| {s.contributor} | {', '.join(s.sites)} | {s.tokens:,} | {s.share:.1%} |"
             for s in shares(verdict.read)]
    return rows + [
        "", f"Shares come from the run's signed, hash-chained ledger (`{LEDGER}`): "
        f"{verdict.entries} entries, head `{head.hash}` (entry {head.seq}). Its last round "
        f"entry records the SHA-256 of the global weights, `{digest}`. Check both with "
        f"`atoll ledger verify RUN_DIR` and `atoll shares RUN_DIR`."]


def _losses(records: list[dict]) -> list[str]:
    """The final validation loss per domain of the federation and each baseline."""
    last: dict[str, dict[str, float]] = {}
    for r in records:
        if r["kind"] == "round" and r.get("val_loss"):
            last[r["run"]] = r["val_loss"]
    if not last:
        return ["No validation data in this run."]
    runs = sorted(last, key=lambda n: (n != FEDERATION, n))
    domains = sorted({d for v in last.values() for d in v})
    rows = ["| run | " + " | ".join(domains) + " | mean |", "|---" * (len(domains) + 2) + "|"]
    for run in runs:
        cells = " | ".join(f"{last[run].get(d, float('nan')):.4f}" for d in domains)
        rows.append(f"| {run} | {cells} | {mean_loss(last[run]):.4f} |")
    return rows + ["", "Baselines: centralised training on the union of the sites' data at "
                   "equal tokens (the same machines in one data centre)."]
