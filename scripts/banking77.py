#!/usr/bin/env python3
"""Banking77 intent classification: a fixed train/holdout split in OpenAI chat
fine-tuning format, and a classical baseline (TF-IDF + logistic regression) that a
fine-tuned adapter's holdout accuracy is compared with.

Needs the packages of /work/pyenv (scikit-learn, numpy); it is a reference tool run by
hand and never runs in CI. Data: /work/shared/data/banking77/train.csv (columns
text,category; 10,003 rows; CC-BY-4.0, see the README and LICENSE there).

  /work/pyenv/bin/python scripts/banking77.py split OUT_DIR [--holdout 1000] [--seed 77]
                                           [--system "Classify the banking query."]
                                           [--data /work/shared/data/banking77]
  /work/pyenv/bin/python scripts/banking77.py baseline OUT_DIR

split (`--system ""`: no system message): shuffles the rows with random.Random(seed) (file order first, so the split is
deterministic), takes the first --holdout rows as the holdout and the rest as train,
and writes OUT_DIR/train.jsonl and OUT_DIR/holdout.jsonl, one line per example:
  {"messages": [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": text},
                {"role": "assistant", "content": category}],
   "label": category}
plus OUT_DIR/labels.json (sorted category names).

baseline: fits TF-IDF features (word 1-2 grams + char_wb 2-5 grams, sublinear tf, in a
FeatureUnion) + LogisticRegression(C=10) on the user texts of train.jsonl, scores
accuracy on holdout.jsonl, prints it and writes OUT_DIR/baseline.json.
"""
import argparse, csv, json, os, random, sys, time

DATA = "/work/shared/data/banking77"
SYSTEM = "Classify the banking query."


def read_rows(data_dir):
    with open(os.path.join(data_dir, "train.csv"), newline="", encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f)]
    cats_path = os.path.join(data_dir, "categories.json")
    if os.path.exists(cats_path):
        cats = set(json.load(open(cats_path)))
        unknown = {c for _, c in rows} - cats
        if unknown:
            sys.exit(f"categories not in categories.json: {sorted(unknown)}")
    return rows


def write_jsonl(path, rows, system):
    with open(path, "w", encoding="utf-8") as f:
        for text, cat in rows:
            msgs = [{"role": "system", "content": system}] if system else []
            msgs += [{"role": "user", "content": text}, {"role": "assistant", "content": cat}]
            ex = {"messages": msgs, "label": cat}
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def split(a):
    rows = read_rows(a.data)
    random.Random(a.seed).shuffle(rows)
    if not 0 < a.holdout < len(rows):
        sys.exit(f"--holdout must be between 1 and {len(rows) - 1}")
    holdout, train = rows[:a.holdout], rows[a.holdout:]
    os.makedirs(a.out_dir, exist_ok=True)
    write_jsonl(os.path.join(a.out_dir, "train.jsonl"), train, a.system)
    write_jsonl(os.path.join(a.out_dir, "holdout.jsonl"), holdout, a.system)
    labels = sorted({c for _, c in rows})
    with open(os.path.join(a.out_dir, "labels.json"), "w") as f:
        json.dump(labels, f, indent=1)
        f.write("\n")
    missing = sorted(set(labels) - {c for _, c in train})
    print(f"rows {len(rows)}: train {len(train)}, holdout {len(holdout)}, labels {len(labels)} "
          f"(seed {a.seed}) -> {a.out_dir}")
    print(f"holdout labels present: {len({c for _, c in holdout})}/{len(labels)}"
          + (f"; labels missing from train: {missing}" if missing else ""))


def read_split(path):
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                ex = json.loads(line)
                texts.append(next(m["content"] for m in ex["messages"] if m["role"] == "user"))
                labels.append(ex["label"])
    return texts, labels


def baseline(a):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, Pipeline
    import sklearn

    Xtr, ytr = read_split(os.path.join(a.out_dir, "train.jsonl"))
    Xho, yho = read_split(os.path.join(a.out_dir, "holdout.jsonl"))
    pipe = Pipeline([
        ("tfidf", FeatureUnion([
            ("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, lowercase=True)),
        ])),
        ("lr", LogisticRegression(C=a.C, max_iter=2000)),
    ])
    t = time.perf_counter()
    pipe.fit(Xtr, ytr)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    pred = pipe.predict(Xho)
    pred_s = time.perf_counter() - t
    acc = sum(p == y for p, y in zip(pred, yho)) / len(yho)
    res = {"model": f"tfidf(word 1-2 + char_wb 2-5, sublinear_tf) + LogisticRegression(C={a.C}, max_iter=2000)",
           "accuracy": round(acc, 4), "correct": int(sum(p == y for p, y in zip(pred, yho))),
           "n_train": len(Xtr), "n_holdout": len(Xho),
           "train_seconds": round(train_s, 2), "predict_seconds": round(pred_s, 3),
           "sklearn": sklearn.__version__}
    with open(os.path.join(a.out_dir, "baseline.json"), "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    print(json.dumps(res, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="write train.jsonl, holdout.jsonl, labels.json")
    s.add_argument("out_dir")
    s.add_argument("--holdout", type=int, default=1000)
    s.add_argument("--seed", type=int, default=77)
    s.add_argument("--system", default=SYSTEM)
    s.add_argument("--data", default=DATA)
    b = sub.add_parser("baseline", help="TF-IDF + logistic regression accuracy on the holdout")
    b.add_argument("out_dir")
    b.add_argument("--C", type=float, default=10.0)
    a = ap.parse_args()
    split(a) if a.cmd == "split" else baseline(a)


if __name__ == "__main__":
    main()
