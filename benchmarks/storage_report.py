"""Markdown tables of bench_storage.py JSON files (several files: their sets are concatenated).

python benchmarks/storage_report.py storage.json storage2.json ...
"""

from __future__ import annotations

import json
import sys

B1 = ["float32", "bfloat16", "int8", "res4", "res2", "res1"]
B4 = ["int8", "res4", "res2", "res1"]


def main() -> None:
    sets = []
    for path in sys.argv[1:]:
        with open(path) as fh:
            data = json.load(fh)
        sets += data["sets"]
        machine = data["machine"]
    print(f"Machine: {machine}\n")
    configs = [f"b1_{s}_r4" for s in B1] + [f"b4_{s}_r4" for s in B4]
    head = ["set", "queries"] + [c.removesuffix("_r4").replace("_", " ") for c in configs]
    print("nDCG@10 at call ratio 4 (b1: stored at base ratio 1 and re-pooled; b4: stored at base ratio 4)\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    deltas: dict[str, list[float]] = {c: [] for c in configs}
    for row in sets:
        ref = row["ndcg_b1_float32_r4"]
        cells = [row["dataset"], str(row["queries"])]
        for c in configs:
            cells.append(f"{row[f'ndcg_{c}']:.4f}")
            deltas[c].append(row[f"ndcg_{c}"] - ref)
        print("| " + " | ".join(cells) + " |")
    print("| mean change vs b1 float32 | | " + " | ".join(f"{sum(v) / len(v):+.4f}" for v in deltas.values()) + " |")
    worst = [max(r[f"maxerr_{c}"] for r in sets) for c in configs]
    print("| max \\|margin error\\| | | " + " | ".join(f"{w:.3f}" for w in worst) + " |")
    r1 = ["b1_float32_r1", "b1_int8_r1", "b1_res4_r1"]
    print("\nnDCG@10 at call ratio 1 (stored at base ratio 1)\n")
    print("| set | float32 | int8 | res4 |\n|---|---|---|---|")
    d1: dict[str, list[float]] = {c: [] for c in r1}
    for row in sets:
        print(f"| {row['dataset']} | " + " | ".join(f"{row[f'ndcg_{c}']:.4f}" for c in r1) + " |")
        for c in r1:
            d1[c].append(row[f"ndcg_{c}"] - row["ndcg_b1_float32_r1"])
    print("| mean change | " + " | ".join(f"{sum(v) / len(v):+.4f}" for v in d1.values()) + " |")
    print("\nMean bytes per stored passage (entry bytes, as `store.stats()` counts them) and x fewer than b1 float32\n")
    cols = [(1, s) for s in B1] + [(4, s) for s in B4]
    print("| set | tokens/passage | " + " | ".join(f"b{b} {s}" for b, s in cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for row in sets:
        ref = row["bytes_b1_float32"]
        cells = [f"{row[f'bytes_b{b}_{s}']:,.0f} ({ref / row[f'bytes_b{b}_{s}']:.0f}x)" for b, s in cols]
        print(f"| {row['dataset']} | {row['tokens_per_passage']:.0f} | " + " | ".join(cells) + " |")
    print("\n10M passages (TB, mean bytes per passage over the sets x 1e7)\n")
    mean = {c: sum(r[f"bytes_b{c[0]}_{c[1]}"] for r in sets) / len(sets) for c in cols}
    print("| " + " | ".join(f"b{b} {s}" for b, s in cols) + " |\n|" + "---|" * len(cols))
    print("| " + " | ".join(f"{mean[c] * 1e7 / 1e12:.3f}" for c in cols) + " |")
    print("\nEncode side: seconds to quantise all passages / seconds to encode them (float32, ratio 1), and training\n")
    print("| set | passages | encode s | " + " | ".join(f"b{b} {s}" for b, s in cols if s != "float32") + " |")
    print("|" + "---|" * (len(cols) + 2))
    for row in sets:
        cells = []
        for b, s in cols:
            if s == "float32":
                continue
            q = row[f"quantise_s_b{b}_{s}"] + row.get(f"train_s_b{b}_{s}", 0.0)
            cells.append(f"{100 * q / row['encode_s']:.1f}%")
        print(f"| {row['dataset']} | {row['passages']} | {row['encode_s']:.0f} | " + " | ".join(cells) + " |")
    print("\nQuery side: decoding 100 stored passages, as a share of one rerank call over them at ratio 4\n")
    print("| set | rerank b1 s | " + " | ".join(f"b{b} {s}" for b, s in cols) + " |")
    print("|" + "---|" * (len(cols) + 2))
    for row in sets:
        cells = []
        for b, s in cols:
            decode = row[f"decode100_s_b{b}_{s}"]
            cells.append(f"{1000 * decode:.1f} ms ({100 * decode / row[f'rerank100_s_b{b}']:.1f}%)")
        print(f"| {row['dataset']} | {row['rerank100_s_b1']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
