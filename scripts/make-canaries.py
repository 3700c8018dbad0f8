#!/usr/bin/env python3
"""Regenerate data/canaries/ from data/udhr/: per language, blocks (paragraphs) are dealt out in
turn to public-1, secret-1, public-2, secret-1, ... so that the sets are disjoint and alike.
public sets retire after 3 scored reveals (public-2 then takes over); the secret reserve is only
ever used for blind audits. Format: see crates/weft-coordinator/src/canary.rs."""
import json
import pathlib

root = pathlib.Path(__file__).resolve().parent.parent
udhr = root / "data" / "udhr"
out = root / "data" / "canaries"
sets = []
for path in sorted(udhr.glob("*.txt")):
    lang = path.stem
    blocks = path.read_text(encoding="utf-8").splitlines()
    deal = {"public-1": [], "public-2": [], "secret-1": []}
    for i, block in enumerate(blocks):
        deal[["public-1", "secret-1", "public-2", "secret-1"][i % 4]].append(block)
    (out / lang).mkdir(parents=True, exist_ok=True)
    for name, lines in deal.items():
        (out / lang / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        visibility = "secret" if name.startswith("secret") else "public"
        sets.append({"id": f"{lang}-{name}", "topic": lang, "visibility": visibility, "difficulty": 1.0,
                     "retire_after": 3, "file": f"{lang}/{name}.txt"})
(out / "canaries.json").write_text(json.dumps({"sets": sets}, indent=1) + "\n", encoding="utf-8")
print(f"wrote {len(sets)} canary sets under {out}")
