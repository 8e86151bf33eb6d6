"""The contributor-facing commands: ``contribute``, ``consent``, ``ledger``, ``shares``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def cmd_contribute(args: argparse.Namespace) -> int:
    """``atoll contribute``: add a file to a site's pool with its owner's consent."""
    from atoll.consent.pool import Pool

    pool = Pool.open_or_create(args.site, seq_len=args.seq_len, tokenizer=args.tokenizer or "")
    try:
        c = pool.contribute(args.contributor, args.file, _words(args.allow),
                            expires=args.expires or "", text_field=args.text_field,
                            log=lambda s: None)
        same = {o.id: o.sha256 for o in pool.contributions()}.get(c.duplicate_of) == c.sha256
    finally:
        pool.close()
    uses = ",".join(c.purposes) + (f" until {c.expires}" if c.expires else "")
    if c.duplicate_of:
        kind = "exact copy" if same else f"near copy, similarity {c.similarity:.2f}"
        print(f"{c.id}: duplicate of {c.duplicate_of} ({kind}): recorded for "
              f"{c.contributor}, not trained on or credited a second time")
    else:
        print(f"{c.id}: {c.tokens:,} tokens from {c.documents} document(s) by "
              f"{c.contributor}, for {uses}")
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    """``atoll consent``: list a site's contributions and their state, or revoke some."""
    from atoll.consent.pool import Pool

    pool = Pool(args.site)
    try:
        if args.action == "revoke":
            if not args.contributor:
                raise ValueError("consent revoke: give --contributor ID")
            ids = pool.revoke(args.contributor, args.contribution or "")
            if not ids:
                raise ValueError(f"{args.site}: {args.contributor} has no live contribution"
                                 + (f" {args.contribution}" if args.contribution else ""))
            print(f"revoked {len(ids)} contribution(s) of {args.contributor}: "
                  f"{', '.join(ids)}; never read again from the site's next round on")
            if args.erase_now:
                pool.erase_revoked()
                print("their rows are erased")
            return 0
        rows = pool.contributions()
    finally:
        pool.close()
    now = time.time()
    print(f"{'contribution':<18}{'contributor':<16}{'tokens':>10}  {'purposes':<28}state")
    for c in rows:
        expired = c.expires and not c.allows(c.purposes[0], now)
        state = ("revoked" + (", erased" if c.erased_at else "") if c.revoked_at else
                 f"duplicate of {c.duplicate_of}" if c.duplicate_of else
                 f"expired {c.expires}" if expired else
                 f"live until {c.expires}" if c.expires else "live")
        print(f"{c.id:<18}{c.contributor:<16}{c.tokens:>10,}  {','.join(c.purposes):<28}"
              f"{state}")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    """``atoll ledger verify``: check a run's ledger chain and signatures; 1 if it fails."""
    from atoll.ledger.chain import verify_ledger

    path = _ledger_path(args.run_dir)
    key = Path(args.key).read_text().strip() if args.key else None
    verdict = verify_ledger(path, key)
    print(verdict, file=sys.stdout if verdict.ok else sys.stderr)
    if not verdict.ok or not args.site_state:
        return 0 if verdict.ok else 1
    return _check_site_heads(path, verdict, key, args.site_state)


def _check_site_heads(path: Path, verdict: Any, key: str | None, state_dirs: list[str]
                      ) -> int:
    """``--site-state``: the heads each site kept, against the ledger; 1 if any is gone."""
    from atoll.ledger.heads import HEADS, check_heads, read_heads

    genesis = verdict.read[0].body if verdict.read else {}
    public = key or str(genesis.get("coordinator_key", ""))
    failed = 0
    for d in state_dirs:
        seen = [h for h in read_heads(Path(d) / HEADS)
                if h.get("run_id") == genesis.get("run_id")]
        problems = check_heads(path, Path(d), str(genesis.get("run_id")), public)
        for line in problems:
            print(f"{d}: {line}", file=sys.stderr)
        if not problems:
            print(f"{d}: all {len(seen)} ledger heads this site saw are in the ledger")
        failed += bool(problems)
    return 1 if failed else 0


def cmd_shares(args: argparse.Namespace) -> int:
    """``atoll shares``: each contributor's share of the model, from a verified ledger."""
    from atoll.ledger.chain import verify_ledger
    from atoll.ledger.credit import shares

    path = _ledger_path(args.run_dir)
    verdict = verify_ledger(path)
    if not verdict.ok:
        print(f"error: {path}: {verdict}; not computing shares from it", file=sys.stderr)
        return 1
    table = shares(verdict.read)
    print(f"{'contributor':<20}{'share':>8}{'tokens':>14}{'value':>12}  sites")
    for s in table:
        print(f"{s.contributor:<20}{s.share:8.2%}{s.tokens:>14,}{s.value:12.4f}  "
              f"{','.join(s.sites)}")
    print(f"{verdict.entries} ledger entries verified; shares sum to "
          f"{sum(s.share for s in table):.4f}")
    return 0


def _ledger_path(run_dir: str) -> Path:
    from atoll.app.books import LEDGER

    path = Path(run_dir) / LEDGER
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no {LEDGER} (not a run folder?)")
    return path


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``contribute``, ``consent``, ``ledger`` and ``shares`` to the command line."""
    c = sub.add_parser("contribute", help="add a contributor's file to a site's data pool")
    c.add_argument("--site", required=True, help="the site's pool directory (created)")
    c.add_argument("--contributor", required=True, help="contributor id")
    c.add_argument("--file", required=True, help="text, JSONL or Parquet file")
    c.add_argument("--allow", required=True,
                   help="purposes it may be used for, e.g. pretraining,research,commercial")
    c.add_argument("--expires", help="ISO date after which it may no longer be used")
    c.add_argument("--text-field", default="text", help="JSONL field / Parquet column")
    c.add_argument("--seq-len", type=int, default=128, help="a new pool's row length")
    c.add_argument("--tokenizer", help="a new pool's tokenizer (local HF directory)")
    c.set_defaults(func=cmd_contribute)

    n = sub.add_parser("consent", help="list or revoke contributions at a site")
    n.add_argument("action", choices=["list", "revoke"])
    n.add_argument("--site", required=True, help="the site's pool directory")
    n.add_argument("--contributor", help="whose consent to revoke")
    n.add_argument("--contribution", help="revoke only this contribution id")
    n.add_argument("--erase-now", action="store_true",
                   help="erase the rows now (otherwise the site does at its next round)")
    n.set_defaults(func=cmd_consent)

    le = sub.add_parser("ledger", help="check a run's contribution ledger")
    le.add_argument("action", choices=["verify"])
    le.add_argument("run_dir")
    le.add_argument("--key", help="file with the coordinator's public key (ledger.key.pub)")
    le.add_argument("--site-state", action="append", default=[], metavar="DIR",
                    help="a site's state directory: check the ledger heads it was sent "
                         "(shows a rewritten or cut history; repeatable)")
    le.set_defaults(func=cmd_ledger)

    sh = sub.add_parser("shares", help="each contributor's share of a run's model")
    sh.add_argument("run_dir")
    sh.set_defaults(func=cmd_shares)
