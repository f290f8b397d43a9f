"""A synthetic census-style income table (in the spirit of UCI Adult), generated, never downloaded.

Each row is one person with numeric, low- and high-cardinality categorical, missing and
variable-length features; the label says whether the yearly income exceeds 50K. The label is
drawn from a known logistic model that has a non-linear age effect (helped by bucketing), an
education × occupation interaction (helped by a crossed column) and a married bonus, so the
Bayes accuracy is known and a feature-column model has something to learn.

=================  ======  ============================================================
feature            kind    values
=================  ======  ============================================================
age                float   18 – 90
education          text    16 levels, tied to education_num
education_num      int     1 – 16
occupation         text    14 levels; missing (no value) for ~5 %
workclass          text    8 levels; missing for ~5 %
marital_status     text    7 levels
gender             text    2 levels
hours_per_week     float   1 – 99
capital_gain       float   0 for ~90 %, else log-normal
native_country     text    40 names incl. non-ASCII ones
languages          text[]  0 – 3 values (variable length), 12 languages
income_50k         int     label, 1 for > 50K
=================  ======  ============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["EDUCATION", "LANGUAGES", "OCCUPATIONS", "WORKCLASSES", "Census", "make_census"]

EDUCATION = ("Preschool", "1st-4th", "5th-6th", "7th-8th", "9th", "10th", "11th", "12th",
             "HS-grad", "Some-college", "Assoc-voc", "Assoc-acdm", "Bachelors", "Masters",
             "Prof-school", "Doctorate")
OCCUPATIONS = ("Tech-support", "Craft-repair", "Other-service", "Sales", "Exec-managerial",
               "Prof-specialty", "Handlers-cleaners", "Machine-op-inspct", "Adm-clerical",
               "Farming-fishing", "Transport-moving", "Priv-house-serv", "Protective-serv",
               "Armed-Forces")
WORKCLASSES = ("Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov",
               "State-gov", "Without-pay", "Never-worked")
MARITAL = ("Married-civ-spouse", "Divorced", "Never-married", "Separated", "Widowed",
           "Married-spouse-absent", "Married-AF-spouse")
COUNTRIES = ("United-States", "México", "Philippines", "Germany", "Canada", "Puerto-Rico",
             "El-Salvador", "India", "Cuba", "England", "Jamaica", "South-Korea", "China",
             "Italy", "Dominican-Republic", "Việt-Nam", "Guatemala", "Japan", "Poland",
             "Columbia", "Taiwan", "Haiti", "Iran", "Portugal", "Nicaragua", "Perú", "France",
             "Greece", "Ecuador", "Ireland", "Hong-Kong", "Cambodia", "Trinadad&Tobago", "Laos",
             "Thailand", "Yugoslavia", "Outlying-US", "Hungary", "Honduras", "Côte-d'Ivoire")
LANGUAGES = ("English", "Spanish", "Tagalog", "German", "French", "Hindi", "Chinese",
             "Korean", "Vietnamese", "Japanese", "Polish", "Portuguese")
# Occupation effect on the income logit; the last term of each tuple is the extra effect per
# education year above 12 (the education × occupation interaction).
_OCC_EFFECT = {"Exec-managerial": (0.9, 0.35), "Prof-specialty": (0.7, 0.45),
               "Tech-support": (0.4, 0.15), "Sales": (0.3, 0.2), "Protective-serv": (0.3, 0.0),
               "Craft-repair": (0.0, 0.0), "Adm-clerical": (-0.2, 0.05),
               "Transport-moving": (-0.1, 0.0), "Machine-op-inspct": (-0.4, 0.0),
               "Farming-fishing": (-0.8, 0.0), "Handlers-cleaners": (-0.9, 0.0),
               "Other-service": (-1.0, 0.0), "Priv-house-serv": (-1.6, 0.0),
               "Armed-Forces": (0.0, 0.0)}


@dataclass
class Census:
    """Rows of raw features, their labels and the true positive probabilities.

    Attributes:
        rows: One ``{feature: value}`` dict per person (missing = key absent;
            ``languages`` is a list).
        labels: ``int64 [n]``, 1 for income > 50K.
        p_true: ``float64 [n]``, the generating model's probability of label 1.
    """

    rows: list[dict]
    labels: np.ndarray
    p_true: np.ndarray

    @property
    def bayes_accuracy(self) -> float:
        """Expected accuracy of the best possible classifier, ``mean(max(p, 1 - p))``."""
        return float(np.maximum(self.p_true, 1 - self.p_true).mean())


def make_census(n: int, seed: int = 0) -> Census:
    """Draw ``n`` people from the fixed generating model with ``numpy``'s generator ``seed``.

    Raises:
        ValueError: ``n`` negative or not an int.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng(seed)
    age = np.clip(rng.gamma(6.0, 6.5, n) + 17, 18, 90).round(0)
    edu = np.clip(np.round(rng.normal(10.0, 2.6, n)), 1, 16).astype(np.int64)
    occ = rng.choice(len(OCCUPATIONS), n, p=_normalise(np.r_[3, 12, 10, 11, 12, 12, 4, 6, 11,
                                                             3, 5, 0.5, 2, 0.1]))
    marital = rng.choice(len(MARITAL), n, p=_normalise([46, 14, 33, 3, 3, 1, 0.2]))
    work = rng.choice(len(WORKCLASSES), n, p=_normalise([70, 8, 3.5, 3, 6.5, 4, 0.1, 0.1]))
    gender = rng.choice(2, n, p=[0.67, 0.33])
    hours = np.clip(np.round(rng.normal(40, 11, n)), 1, 99)
    gain = np.where(rng.random(n) < 0.1, np.round(np.exp(rng.normal(8.5, 1.0, n))), 0.0)
    country = rng.choice(len(COUNTRIES), n, p=_normalise([90] + [10 / 39] * 39))

    occ_base = np.array([_OCC_EFFECT[o][0] for o in OCCUPATIONS])[occ]
    occ_edu = np.array([_OCC_EFFECT[o][1] for o in OCCUPATIONS])[occ]
    logit = 1.6 * (-1.9 + 0.25 * (edu - 10) + occ_base + occ_edu * np.maximum(edu - 12, 0)
             + 1.6 * (marital == 0) - 0.0018 * (age - 48) ** 2 + 0.03 * (hours - 40)
             + 0.25 * np.log1p(gain) - 0.2 * gender)
    p = 1 / (1 + np.exp(-logit))
    labels = (rng.random(n) < p).astype(np.int64)

    occ_missing = rng.random(n) < 0.05
    work_missing = rng.random(n) < 0.05
    n_lang = rng.choice(4, n, p=[0.1, 0.6, 0.25, 0.05])
    rows = []
    for i in range(n):
        row = {"age": float(age[i]), "education": EDUCATION[edu[i] - 1],
               "education_num": int(edu[i]), "marital_status": MARITAL[marital[i]],
               "gender": ("Male", "Female")[gender[i]], "hours_per_week": float(hours[i]),
               "capital_gain": float(gain[i]), "native_country": COUNTRIES[country[i]],
               "languages": [LANGUAGES[j] for j in rng.choice(len(LANGUAGES), n_lang[i],
                                                              replace=False)],
               "income_50k": int(labels[i])}
        if not occ_missing[i]:
            row["occupation"] = OCCUPATIONS[occ[i]]
        if not work_missing[i]:
            row["workclass"] = WORKCLASSES[work[i]]
        rows.append(row)
    return Census(rows, labels, p)


def _normalise(weights) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()
