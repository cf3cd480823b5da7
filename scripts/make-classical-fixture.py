#!/usr/bin/env python3
"""One-off: the classical arm's reference fixture. A sample of Banking77 (CC-BY-4.0,
Casanueva et al. 2020; /work/shared/data/banking77) split into train and test rows,
with what scikit-learn's TfidfVectorizer (word 1-2 grams + char_wb 2-5 grams,
sublinear tf, FeatureUnion) + LinearSVC(C=1) make of it: the number of features, the
first test rows' feature vectors, every test prediction and the accuracy. Needs
scikit-learn (PyPI); not run in CI.

  python3 scripts/make-classical-fixture.py classical/tests/fixtures/classical_banking77.json
"""
import csv, json, random, sys, time
import sklearn
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.pipeline import FeatureUnion
from sklearn.svm import LinearSVC

rows = [(r["text"], r["category"]) for r in csv.DictReader(open("/work/shared/data/banking77/train.csv", newline="", encoding="utf-8"))]
random.Random(40).shuffle(rows)
train, test = rows[:3000], rows[3000:4000]
fu = FeatureUnion([("word", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
                   ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True))])
t = time.perf_counter()
A = fu.fit_transform([r[0] for r in train])
m = LinearSVC(C=1.0).fit(A, [r[1] for r in train])
secs = time.perf_counter() - t
B = fu.transform([r[0] for r in test]).tocsr()
pred = list(m.predict(B))
acc = sum(p == r[1] for p, r in zip(pred, test)) / len(test)
first = []
for i in range(5):
    row = B.getrow(i).tocoo()
    first.append(sorted([[int(j), float(v)] for j, v in zip(row.col, row.data)]))
out = {"source": "Banking77 train split (PolyAI, CC-BY-4.0; Casanueva et al. 2020, arXiv:2003.04807): 4,000 rows, random.Random(40)",
       "sklearn": sklearn.__version__, "model": "TfidfVectorizer word 1-2 + char_wb 2-5, sublinear_tf, FeatureUnion; LinearSVC(C=1)",
       "train": train, "test": test, "n_features": int(A.shape[1]), "first_test_rows": first,
       "predictions": pred, "accuracy": acc, "train_seconds": round(secs, 2)}
json.dump(out, open(sys.argv[1], "w"), ensure_ascii=False, separators=(",", ":"))
print("accuracy", acc, "features", A.shape[1], "seconds", round(secs, 2))
