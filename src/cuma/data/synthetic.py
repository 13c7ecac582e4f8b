"""Synthetic population in the WorldValuesBench layout, with known answer distributions.

The generator writes the files the real WVB loader (:func:`cuma.data.wvb.load_wvb`) reads, unchanged::

    OUT/WorldValuesBench/{full,train,valid,test}/{split}_{demographic,value}_qa.tsv
    OUT/dataset_construction/{question_metadata,codebook,answer_adjustment}.json
    OUT/truth.json        true answer distribution per distinct profile and question, plus the oracle figures
    OUT/manifest.json     generator config, counts, sha256 of every file

Model (all draws from ``numpy.random.default_rng`` streams derived from the seed, so a seed gives identical bytes):

1. **Participants.** Country uniform over ``countries`` countries; religion from the country's religion mix;
   age group, gender, education, marital status, employment (correlated with age) and ethnicity (mostly the
   country's majority group) from fixed distributions. About 1% of education / employment answers are missing codes.
   ``country_set="zones"`` (the default) takes real countries grouped by the Inglehart-Welzel cultural zones of the
   World Values Survey's cultural map (:data:`ZONES`: Protestant Europe, English-speaking, Catholic Europe, Orthodox
   Europe, Confucian, West & South Asia, African-Islamic, Latin America), round-robin over the chosen ``zones``;
   ``country_set="invented"`` takes the invented names of :data:`COUNTRIES`, which a sentence encoder has no prior
   about (so zero-shot transfer to an unseen one cannot work). Religion mixes are rough, illustrative shares.
   ``profile_fields`` limits the demographic columns that carry values (the others are written as missing, so the
   profile sentence holds only those fields).
2. **Latent cultural mode.** ``p(mode | profile) = softmax(country_logits[c] + religion_logits[r] + age_logits[a])``:
   each country has a dominant mode (``+country_strength``, plus N(0, 0.4) noise on every mode), each religion a
   preferred mode (``+religion_strength``), the young (16-34) and the old (55+) one mode each (``+age_strength``).
   With zones a religion prefers the mode of the zones where it is most common; with invented countries, a random
   one. With zones, a country's dominant mode is its zone's (the zones, in their order around the map, share the modes in
   contiguous runs: with as many modes as zones each zone has its own); with invented countries modes are dealt out
   at random.
   Country predicts the mode strongly, religion and age weakly; the mode itself is never written anywhere except
   as probabilities in ``truth.json``. Each participant draws ONE mode and answers every question from it.
3. **Answers.** Each question has one answer distribution per mode over its options: a peak at an option with a
   Gaussian fall-off (width grows with the scale length), mixed with 8% uniform. On *conflicting* questions (about
   85%) the modes peak at different options, spread over the scale; on *agreeing* questions all modes share one
   distribution. About ``missing_rate`` of answer cells are left empty (a few hold the code ``-1``).
4. **Truth.** For a profile, the true distribution of an answer is the mixture ``sum_m p(m | profile) p(answer | m)``.
   ``truth.json`` stores it per distinct profile text (:meth:`cuma.profiles.Profile.to_text`) and question.

Scale types follow WVB: (1,4), (1,10), (1,2), (1,5), (1,3), (0,2). Two questions (when there are at least 8) are
*recoded* like WVB's Q119 and Q56: their codebook is in raw codes and ``answer_adjustment.json`` moves them (raw 0
"Hard to say" -> 3, 3 -> 4, 4 -> 5; and a 2 <-> 3 swap), so the loader's label mapping is exercised end to end.

Oracle figures (:func:`oracle_metrics`, on the test split by default; the evaluator's metrics must match them):

- ``accuracy``: fraction of (participant, question) pairs whose answer equals the argmax of the true distribution
  of the participant's profile (the best any model can do in expectation); ``accuracy_expected``: the mean of
  ``max_k p_k`` (its expectation over answer noise).
- ``emd_mean`` / ``emd_median``: per question, the 1-D Wasserstein distance between the normalised answers
  ``(x - min) / (max - min)`` of the evaluated participants and the normalised argmax predictions, then mean /
  median over questions. ``emd_expected_*``: the same with the predictions replaced by the average predicted
  distribution (weights on the option values).
- ``population_accuracy`` / ``population_emd_mean``: the same for one prediction per question, the argmax of the
  population's marginal distribution (what a mean-collapsed model predicts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..metrics import wasserstein_1d  # the evaluator's W1, so the oracle's EMD is the reported one
from ..profiles import WVB_FIELD_MAP, Profile
from ..runinfo import atomic_directory, atomic_write_json, dumps, package_versions, sha256_file

__all__ = [
    "COUNTRIES",
    "SynthConfig",
    "generate",
    "load_truth",
    "oracle_metrics",
    "question_pool",
    "wasserstein_1d",
    "write_synthetic",
]

PathLike = Union[str, os.PathLike]

TRUTH_FORMAT = "cuma-synthetic-truth"
TRUTH_VERSION = 1

# --------------------------------------------------------------------------------------------------------- population

# (name, numeric code, demonym, religion mix). Invented countries; religions are ordinary denominations.
COUNTRIES: tuple[tuple[str, int, str, dict[str, float]], ...] = (
    ("Ardenia", 901, "Ardenian", {"Roman Catholic": 0.6, "Protestant": 0.15, "No religion": 0.25}),
    ("Belmora", 902, "Belmoran", {"Muslim": 0.85, "Orthodox": 0.05, "No religion": 0.1}),
    ("Corvath", 903, "Corvathi", {"Orthodox": 0.7, "No religion": 0.2, "Muslim": 0.1}),
    ("Dunmere", 904, "Dunmerian", {"Protestant": 0.35, "No religion": 0.55, "Roman Catholic": 0.1}),
    ("Estrava", 905, "Estravan", {"Roman Catholic": 0.8, "Protestant": 0.1, "No religion": 0.1}),
    ("Kantara", 906, "Kantari", {"Hindu": 0.75, "Muslim": 0.15, "Buddhist": 0.1}),
    ("Sundara", 907, "Sundaran", {"Buddhist": 0.7, "No religion": 0.2, "Roman Catholic": 0.1}),
    ("Valdoria", 908, "Valdorian", {"No religion": 0.6, "Protestant": 0.25, "Roman Catholic": 0.15}),
    ("Marovia", 909, "Marovian", {"Orthodox": 0.5, "Roman Catholic": 0.3, "No religion": 0.2}),
    ("Quelmar", 910, "Quelmari", {"Muslim": 0.6, "Roman Catholic": 0.25, "No religion": 0.15}),
    ("Tavoria", 911, "Tavorian", {"Protestant": 0.5, "Roman Catholic": 0.2, "No religion": 0.3}),
    ("Norvinde", 912, "Norvindish", {"No religion": 0.45, "Protestant": 0.45, "Muslim": 0.1}),
)
# Inglehart-Welzel cultural zones (World Values Survey cultural map), in their order around the map (neighbouring
# zones are neighbours on it): zone -> (name, ISO 3166 numeric code, demonym, religion mix). Real country names, so a
# sentence encoder knows which are alike; the religion mixes are rough illustrative shares, not survey figures.
ZONES: dict[str, tuple[tuple[str, int, str, dict[str, float]], ...]] = {
    "Protestant Europe": (
        ("Sweden", 752, "Swedish", {"No religion": 0.55, "Protestant": 0.4, "Muslim": 0.05}),
        ("Norway", 578, "Norwegian", {"Protestant": 0.6, "No religion": 0.35, "Muslim": 0.05}),
        ("Denmark", 208, "Danish", {"Protestant": 0.7, "No religion": 0.25, "Muslim": 0.05}),
        ("Finland", 246, "Finnish", {"Protestant": 0.7, "No religion": 0.27, "Orthodox": 0.03}),
        ("Netherlands", 528, "Dutch", {"No religion": 0.55, "Roman Catholic": 0.2, "Protestant": 0.15, "Muslim": 0.1}),
        ("Germany", 276, "German", {"No religion": 0.4, "Protestant": 0.28, "Roman Catholic": 0.27, "Muslim": 0.05}),
    ),
    "English-speaking": (
        ("United States", 840, "American", {"Protestant": 0.45, "Roman Catholic": 0.2, "No religion": 0.35}),
        ("United Kingdom", 826, "British", {"No religion": 0.5, "Protestant": 0.35, "Roman Catholic": 0.1, "Muslim": 0.05}),
        ("Canada", 124, "Canadian", {"Roman Catholic": 0.3, "Protestant": 0.25, "No religion": 0.4, "Muslim": 0.05}),
        ("Australia", 36, "Australian", {"No religion": 0.4, "Protestant": 0.3, "Roman Catholic": 0.25, "Buddhist": 0.05}),
        ("New Zealand", 554, "New Zealander", {"No religion": 0.5, "Protestant": 0.35, "Roman Catholic": 0.15}),
        ("Ireland", 372, "Irish", {"Roman Catholic": 0.75, "No religion": 0.2, "Protestant": 0.05}),
    ),
    "Catholic Europe": (
        ("France", 250, "French", {"Roman Catholic": 0.45, "No religion": 0.45, "Muslim": 0.1}),
        ("Spain", 724, "Spanish", {"Roman Catholic": 0.65, "No religion": 0.33, "Muslim": 0.02}),
        ("Italy", 380, "Italian", {"Roman Catholic": 0.8, "No religion": 0.18, "Muslim": 0.02}),
        ("Portugal", 620, "Portuguese", {"Roman Catholic": 0.8, "No religion": 0.18, "Protestant": 0.02}),
        ("Austria", 40, "Austrian", {"Roman Catholic": 0.6, "No religion": 0.3, "Muslim": 0.07, "Protestant": 0.03}),
        ("Poland", 616, "Polish", {"Roman Catholic": 0.9, "No religion": 0.1}),
    ),
    "Orthodox Europe": (
        ("Russia", 643, "Russian", {"Orthodox": 0.6, "No religion": 0.3, "Muslim": 0.1}),
        ("Ukraine", 804, "Ukrainian", {"Orthodox": 0.75, "No religion": 0.15, "Roman Catholic": 0.1}),
        ("Romania", 642, "Romanian", {"Orthodox": 0.85, "Roman Catholic": 0.05, "Protestant": 0.05, "No religion": 0.05}),
        ("Serbia", 688, "Serbian", {"Orthodox": 0.85, "Roman Catholic": 0.05, "Muslim": 0.05, "No religion": 0.05}),
        ("Bulgaria", 100, "Bulgarian", {"Orthodox": 0.7, "Muslim": 0.1, "No religion": 0.2}),
        ("Greece", 300, "Greek", {"Orthodox": 0.9, "No religion": 0.08, "Muslim": 0.02}),
    ),
    "Confucian": (
        ("China", 156, "Chinese", {"No religion": 0.8, "Buddhist": 0.18, "Protestant": 0.02}),
        ("Japan", 392, "Japanese", {"No religion": 0.6, "Buddhist": 0.38, "Protestant": 0.02}),
        ("South Korea", 410, "Korean", {"No religion": 0.5, "Protestant": 0.2, "Buddhist": 0.15, "Roman Catholic": 0.15}),
        ("Taiwan", 158, "Taiwanese", {"No religion": 0.55, "Buddhist": 0.35, "Protestant": 0.1}),
        ("Hong Kong", 344, "Hong Konger", {"No religion": 0.65, "Buddhist": 0.15, "Protestant": 0.12, "Roman Catholic": 0.08}),
        ("Macau", 446, "Macanese", {"No religion": 0.6, "Buddhist": 0.3, "Roman Catholic": 0.1}),
    ),
    "West & South Asia": (
        ("India", 356, "Indian", {"Hindu": 0.8, "Muslim": 0.14, "Protestant": 0.03, "Buddhist": 0.03}),
        ("Thailand", 764, "Thai", {"Buddhist": 0.93, "Muslim": 0.05, "No religion": 0.02}),
        ("Philippines", 608, "Filipino", {"Roman Catholic": 0.8, "Protestant": 0.1, "Muslim": 0.1}),
        ("Sri Lanka", 144, "Sri Lankan", {"Buddhist": 0.7, "Hindu": 0.12, "Muslim": 0.1, "Roman Catholic": 0.08}),
        ("Nepal", 524, "Nepali", {"Hindu": 0.8, "Buddhist": 0.1, "Muslim": 0.05, "No religion": 0.05}),
        ("Myanmar", 104, "Burmese", {"Buddhist": 0.88, "Protestant": 0.06, "Muslim": 0.04, "Hindu": 0.02}),
    ),
    "African-Islamic": (
        ("Nigeria", 566, "Nigerian", {"Muslim": 0.5, "Protestant": 0.35, "Roman Catholic": 0.15}),
        ("Egypt", 818, "Egyptian", {"Muslim": 0.9, "Orthodox": 0.1}),
        ("Pakistan", 586, "Pakistani", {"Muslim": 0.97, "Hindu": 0.02, "Protestant": 0.01}),
        ("Morocco", 504, "Moroccan", {"Muslim": 0.99, "No religion": 0.01}),
        ("Jordan", 400, "Jordanian", {"Muslim": 0.95, "Orthodox": 0.05}),
        ("Kenya", 404, "Kenyan", {"Protestant": 0.6, "Roman Catholic": 0.2, "Muslim": 0.15, "No religion": 0.05}),
    ),
    "Latin America": (
        ("Mexico", 484, "Mexican", {"Roman Catholic": 0.8, "Protestant": 0.1, "No religion": 0.1}),
        ("Brazil", 76, "Brazilian", {"Roman Catholic": 0.55, "Protestant": 0.3, "No religion": 0.15}),
        ("Argentina", 32, "Argentine", {"Roman Catholic": 0.65, "No religion": 0.2, "Protestant": 0.15}),
        ("Colombia", 170, "Colombian", {"Roman Catholic": 0.7, "Protestant": 0.18, "No religion": 0.12}),
        ("Peru", 604, "Peruvian", {"Roman Catholic": 0.75, "Protestant": 0.17, "No religion": 0.08}),
        ("Chile", 152, "Chilean", {"Roman Catholic": 0.5, "Protestant": 0.15, "No religion": 0.35}),
    ),
}
COUNTRY_SETS = ("zones", "invented")
# each zone's approximate place on the Inglehart-Welzel map (traditional -> secular-rational values, survival ->
# self-expression values), read off the published 2023 map; mode_layout "map" places the modes there
ZONE_MAP: dict[str, tuple[float, float]] = {
    "Protestant Europe": (1.5, 2.0),
    "English-speaking": (0.3, 1.8),
    "Catholic Europe": (0.6, 0.8),
    "Orthodox Europe": (0.7, -1.0),
    "Confucian": (1.6, -0.6),
    "West & South Asia": (-0.4, -0.6),
    "African-Islamic": (-1.4, -0.6),
    "Latin America": (-1.2, 0.6),
}
MODE_LAYOUTS = ("random", "map")
# the profile fields a synthetic population can carry (WVB demographic columns); all by default
PROFILE_COLUMNS = ("B_COUNTRY", "X003R", "Q260", "Q275", "Q273", "Q289", "Q290", "Q279")

RELIGIONS: tuple[str, ...] = (
    "No religion", "Roman Catholic", "Protestant", "Orthodox", "Muslim", "Hindu", "Buddhist",
)  # fmt: skip
RELIGION_CODES = {"No religion": 0, "Roman Catholic": 1, "Protestant": 2, "Orthodox": 3, "Muslim": 5, "Hindu": 6,
                  "Buddhist": 7}  # fmt: skip
AGE_GROUPS: tuple[str, ...] = ("16-24", "25-34", "35-44", "45-54", "55-64", "65+")
AGE_WEIGHTS = (0.14, 0.18, 0.18, 0.17, 0.16, 0.17)
AGE_RANGES = ((16, 24), (25, 34), (35, 44), (45, 54), (55, 64), (65, 89))
GENDERS = ("Male", "Female")
EDUCATION = ("Primary education", "Lower secondary education", "Upper secondary education", "Bachelor or equivalent",
             "Master or equivalent")  # fmt: skip
EDUCATION_WEIGHTS = (0.15, 0.2, 0.35, 0.2, 0.1)
MARITAL = ("Married", "Living together as married", "Divorced", "Widowed", "Single")
MARITAL_WEIGHTS = (0.48, 0.08, 0.07, 0.1, 0.27)
EMPLOYMENT = ("Full time", "Part time", "Self employed", "Retired", "Housewife", "Student", "Unemployed")
EMPLOYMENT_WEIGHTS = (0.42, 0.1, 0.1, 0.12, 0.08, 0.08, 0.1)
MISSING_CODES = {"-1": "Don't know", "-2": "No answer", "-4": "Not asked", "-5": "Missing; Not available"}

# demographic columns written (D_INTERVIEW first); the profile uses the WVB_FIELD_MAP subset
DEMOGRAPHIC_COLUMNS = ("D_INTERVIEW", "B_COUNTRY", "X003R", "Q260", "Q262", "Q273", "Q275", "Q279", "Q289", "Q290")
DEMOGRAPHIC_QUESTIONS = {
    "D_INTERVIEW": ("What is the unique ID for this interview?", "Technical Variables"),
    "B_COUNTRY": ("In what country was the interview conducted?", "Technical Variables"),
    "X003R": ("Which age interval do you belong to?", "Demographic and Socioeconomic Variables"),
    "Q260": ("What is your sex?", "Demographic and Socioeconomic Variables"),
    "Q262": ("How old are you?", "Demographic and Socioeconomic Variables"),
    "Q273": ("What is your marital status?", "Demographic and Socioeconomic Variables"),
    "Q275": ("What is the highest educational level that you have attained?", "Demographic and Socioeconomic Variables"),
    "Q279": ("What is your employment status?", "Demographic and Socioeconomic Variables"),
    "Q289": ("Do you belong to a religion or religious denomination? If yes, which one?", "Religious Values"),
    "Q290": ("Which ethnic group do you belong to?", "Demographic and Socioeconomic Variables"),
}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator (see the module docstring for the model)."""

    participants: int = 5000
    questions: int = 40
    modes: int = 4
    seed: int = 0
    countries: int = 10
    # "zones": real countries of the Inglehart-Welzel zones (ZONES); "invented": invented names (no encoder prior)
    country_set: str = "zones"
    zones: tuple = ()  # zone names (country_set "zones"); empty: all eight, in map order
    profile_fields: tuple = ()  # WVB demographic columns that carry values (PROFILE_COLUMNS); empty: all
    # "random": on each question the modes peak at random places of the scale; "map" (zones only): they peak in the
    # order of their places on the cultural map along a random direction of it (modes close on the map answer alike)
    mode_layout: str = "random"
    # a mode's answer distribution: a peak with Gaussian fall-off (width x answer_width) mixed with answer_noise of
    # uniform answers; smaller values give participants who answer closer to their mode
    answer_width: float = 1.0
    answer_noise: float = 0.08
    missing_rate: float = 0.03
    agree_fraction: float = 0.15
    country_strength: float = 2.2
    religion_strength: float = 0.8
    age_strength: float = 0.6
    train_fraction: float = 0.7
    valid_fraction: float = 0.15

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option when a knob is out of range."""

        def whole(value: Any, lo: int, hi: Optional[int]) -> bool:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
            return ok and (hi is None or value <= hi)

        pool = _pool_size(question_pool())
        unknown_zones = [z for z in self.zones if z not in ZONES]
        unknown_fields = [f for f in self.profile_fields if f not in PROFILE_COLUMNS]
        if self.country_set not in COUNTRY_SETS:
            raise ValueError(f"--country-set must be one of {list(COUNTRY_SETS)}, got {self.country_set!r}")
        if self.mode_layout not in MODE_LAYOUTS:
            raise ValueError(f"mode_layout must be one of {list(MODE_LAYOUTS)}, got {self.mode_layout!r}")
        if self.mode_layout == "map" and self.country_set != "zones":
            raise ValueError("mode_layout 'map' needs country_set 'zones' (invented countries have no map place)")
        if unknown_zones:
            raise ValueError(f"--zones: unknown zone(s) {unknown_zones}; zones: {list(ZONES)}")
        if len(set(self.zones)) != len(self.zones):
            raise ValueError(f"--zones lists a zone twice: {list(self.zones)}")
        # country, age group (X003R) and religion (Q289) shape the latent mode: a profile without one of them would
        # not determine its true distribution
        needed = ("B_COUNTRY", "X003R", "Q289")
        if unknown_fields or (self.profile_fields and any(f not in self.profile_fields for f in needed)):
            raise ValueError(
                f"profile_fields must be WVB demographic columns among {list(PROFILE_COLUMNS)} and include "
                f"{', '.join(needed)} (the fields that shape the latent mode), got {list(self.profile_fields)}"
            )
        available = len(_country_table(self))
        checks = [
            (whole(self.participants, 20, None), f"--participants must be an integer >= 20, got {self.participants!r}"),
            (whole(self.questions, 1, pool), f"--questions must be 1..{pool}, got {self.questions!r}"),
            (whole(self.modes, 2, 12), f"--modes must be 2..12, got {self.modes!r}"),
            (whole(self.countries, 2, available),
             f"--countries must be 2..{available} for country set {self.country_set!r}, got {self.countries!r}"),
            (whole(self.seed, 0, None), f"--seed must be a non-negative integer, got {self.seed!r}"),
            (0.0 <= self.missing_rate < 0.5, f"missing_rate must be in [0, 0.5), got {self.missing_rate!r}"),
            (0.0 <= self.agree_fraction <= 1.0, f"agree_fraction must be in [0, 1], got {self.agree_fraction!r}"),
            (self.answer_width > 0, f"answer_width must be > 0, got {self.answer_width!r}"),
            (0.0 <= self.answer_noise < 1.0, f"answer_noise must be in [0, 1), got {self.answer_noise!r}"),
            (
                0 < self.train_fraction and 0 < self.valid_fraction and self.train_fraction + self.valid_fraction < 1,
                "train_fraction and valid_fraction must be positive and sum to less than 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _country_table(config: "SynthConfig") -> list[tuple[str, int, str, dict[str, float], Optional[str]]]:
    """Every country the config can draw from, in drawing order: (name, code, demonym, religion mix, zone)."""
    if config.country_set == "invented":
        return [(*c, None) for c in COUNTRIES]
    zones = list(config.zones) or list(ZONES)
    out = []
    for i in range(max(len(ZONES[z]) for z in zones)):  # round-robin: the first country of every zone, then ...
        for z in zones:
            if i < len(ZONES[z]):
                out.append((*ZONES[z][i], z))
    return out


def _dominant_modes(countries, modes: int, rng: np.random.Generator) -> np.ndarray:
    """Each country's dominant mode: its zone's (zones share modes in contiguous runs of the map order), or dealt
    out at random for invented countries."""
    if countries[0][4] is None:
        return rng.permutation(np.arange(len(countries)) % modes)
    zones = list(dict.fromkeys(c[4] for c in countries))
    order = sorted(zones, key=list(ZONES).index)  # map order
    zone_mode = {z: (i * modes) // len(order) for i, z in enumerate(order)}
    return np.array([zone_mode[c[4]] for c in countries])


# --------------------------------------------------------------------------------------------------------- questions

_AGREE4 = ["Strongly agree", "Agree", "Disagree", "Strongly disagree"]
_AGREE5 = ["Strongly agree", "Agree", "Neither agree nor disagree", "Disagree", "Strongly disagree"]


def _ten(lo: str, hi: str) -> list[str]:
    return [lo] + [str(i) for i in range(2, 10)] + [hi]


@dataclass(frozen=True)
class _Family:
    key: str
    scale: tuple[int, int]
    category: str
    weight: float
    items: tuple[tuple[list[str], str], ...]  # (labels on the adjusted scale, question body starting lower-case)
    raw_codes: Optional[tuple[int, ...]] = None  # raw code of each adjusted option (None: identity)
    adjustment: Optional[dict[str, str]] = None


def _family(key, scale, category, weight, labels, template, topics, **kw) -> _Family:
    return _Family(key, scale, category, weight, tuple((list(labels), template.format(t)) for t in topics), **kw)


def question_pool() -> list[_Family]:
    """The question families the generator draws from (wording in WVB's style, all invented for this dataset)."""
    imp = ["Very important", "Rather important", "Not very important", "Not at all important"]
    conf = ["A great deal", "Quite a lot", "Not very much", "None at all"]
    families = [
        _family("importance", (1, 4), "Social Values, Norms, Stereotypes", 0.14, imp, "how important {} in your life?",
                ["is family", "are friends", "is leisure time", "are politics", "is work", "is religion",
                 "is tradition", "is service to others"]),
        _family("agree4", (1, 4), "Social Values, Norms, Stereotypes", 0.14, _AGREE4,
                "how strongly do you agree or disagree with the following statement: {}?",
                ["One of my main goals in life has been to make my parents proud",
                 "When a mother works for pay, the children suffer",
                 "On the whole, men make better political leaders than women do",
                 "A university education is more important for a boy than for a girl",
                 "Being a housewife is just as fulfilling as working for pay",
                 "Elders should have the final say in family matters",
                 "Adult children should look after their parents in old age",
                 "Neighbours should be able to rely on one another"]),
        _family("confidence", (1, 4), "Social Capital, Trust and Organizational Membership", 0.12, conf,
                "how much confidence do you have in {}?",
                ["the churches", "the armed forces", "the press", "labour unions", "the police", "the courts",
                 "the government", "political parties", "parliament", "the civil service", "universities",
                 "major companies"]),
        _family("justifiable", (1, 10), "Ethical Values and Norms", 0.14, _ten("Never justifiable", "Always justifiable"),
                "how justifiable do you think it is: {}?",
                ["claiming government benefits to which you are not entitled", "avoiding a fare on public transport",
                 "cheating on taxes if you have a chance", "someone accepting a bribe in the course of their duties",
                 "divorce", "euthanasia", "having casual sex", "political violence", "the death penalty",
                 "parents beating children"]),
        _Family("views10", (1, 10), "Economic Values", 0.07, (
            (_ten("Incomes should be made more equal", "There should be greater incentives for individual effort"),
             "where would you place your views on incomes?"),
            (_ten("Private ownership of business should be increased", "Government ownership of business should be increased"),
             "where would you place your views on the ownership of business?"),
            (_ten("The government should take more responsibility", "People should take more responsibility for themselves"),
             "where would you place your views on who should provide for people?"),
            (_ten("Competition is good", "Competition is harmful"), "where would you place your views on competition?"),
            (_ten("Hard work usually brings a better life", "Success is more a matter of luck and connections"),
             "where would you place your views on hard work?"),
            (_ten("Completely dissatisfied", "Completely satisfied"),
             "all things considered, how satisfied are you with your life as a whole these days?"),
        )),
        _family("neighbours", (1, 2), "Social Values, Norms, Stereotypes", 0.07, ["Yes", "No"],
                "would you be uncomfortable having {} as neighbors?",
                ["drug addicts", "people of a different race", "immigrants/foreign workers", "heavy drinkers",
                 "unmarried couples living together", "people who speak a different language",
                 "people of a different religion", "homosexuals"]),
        _family("qualities", (1, 2), "Social Values, Norms, Stereotypes", 0.07, ["Yes", "No"],
                "is it especially important that children are encouraged to learn {} at home?",
                ["good manners", "independence", "hard work", "thrift and saving money", "religious faith",
                 "obedience", "imagination", "tolerance and respect for other people"]),
        _family("agree5", (1, 5), "Economic Values", 0.08, _AGREE5,
                "how strongly do you agree or disagree with the following statement: {}?",
                ["Work is a duty towards society", "People who don't work turn lazy",
                 "Work should always come first, even if it means less spare time",
                 "When jobs are scarce, employers should give priority to people of this country over immigrants",
                 "It is humiliating to receive money without having to work for it",
                 "Having a job is the best way for a woman to be an independent person"]),
        _family("future", (1, 3), "Social Values, Norms, Stereotypes", 0.07, ["Good thing", "Don't mind", "Bad thing"],
                "if {} happened in the near future, would it be a good thing, a bad thing, or don't you mind?",
                ["less importance placed on work", "more emphasis on the development of technology",
                 "greater respect for authority"]),
        _family("immigration", (0, 2), "Perceptions of Migration", 0.1, ["Disagree", "Hard to say", "Agree"],
                "do you agree or disagree that immigration {}?",
                ["fills important job vacancies", "strengthens cultural diversity", "increases the crime rate",
                 "gives asylum to political refugees who are persecuted elsewhere", "increases the risks of terrorism",
                 "offers people from poor countries a better living", "increases unemployment",
                 "leads to social conflict"]),
        # recoded like WVB's Q119: raw codes 1, 2, 0 (hard to say), 3, 4 -> adjusted 1..5
        _Family("recode_middle", (1, 5), "Perceptions of Corruption", 0.0, (
            (["Strongly agree", "Agree", "Hard to say", "Disagree", "Strongly disagree"],
             "how strongly do you agree or disagree with the following statement: \"on the whole, small towns are "
             "less corrupt than big cities\"?"),
        ), raw_codes=(1, 2, 0, 3, 4), adjustment={"0": "3", "3": "4", "4": "5"}),
        # recoded like WVB's Q56: raw 1 better, 2 worse, 3 same -> adjusted 1 better, 2 same, 3 worse
        _Family("recode_swap", (1, 3), "Economic Values", 0.0, (
            (["Better off", "About the same", "Worse off"],
             "comparing your standard of living with your parents' at your age, are you better off, worse off, or "
             "about the same?"),
        ), raw_codes=(1, 3, 2), adjustment={"2": "3", "3": "2"}),
    ]  # fmt: skip
    return families


def _pool_size(families: Sequence[_Family]) -> int:
    return sum(len(f.items) for f in families)


def _select_questions(n: int, rng: np.random.Generator) -> list[tuple[_Family, int]]:
    """``n`` (family, item index) pairs: the two recoded questions when n >= 8, the rest by family weight."""
    families = question_pool()
    recoded = [f for f in families if f.adjustment]
    regular = [f for f in families if not f.adjustment]
    chosen: list[tuple[_Family, int]] = []
    if n >= 8:
        chosen += [(f, 0) for f in recoded]
    remaining = n - len(chosen)  # <= the regular pool: n is capped at the whole pool by SynthConfig.validate
    weights = np.array([f.weight for f in regular], dtype=float)
    caps = np.array([len(f.items) for f in regular])
    counts = np.zeros(len(regular), dtype=int)
    for _ in range(remaining):  # greedy largest-deficit allocation under the caps
        target = weights / weights.sum() * (counts.sum() + 1)
        deficit = np.where(counts < caps, target - counts, -np.inf)
        counts[int(np.argmax(deficit))] += 1
    picks: list[tuple[_Family, int]] = []
    for fam, k in zip(regular, counts):
        if k:
            order = rng.permutation(len(fam.items))[:k]
            picks += [(fam, int(i)) for i in sorted(order)]
    # keep WVB's habit of grouping questions by category; the recoded ones go where their category is
    out = picks + chosen
    cat_order = {c: i for i, c in enumerate(dict.fromkeys(f.category for f in families))}
    out.sort(key=lambda fi: (cat_order[fi[0].category], fi[0].key, fi[1]))
    return out


def _metadata_text(lo: int, hi: int, labels: Sequence[str], body: str) -> str:
    return f"On a scale of {lo} to {hi}, {lo} meaning '{labels[0]}' and {hi} meaning '{labels[-1]}', {body}"


def _mode_distributions(
    k: int, modes: int, agree: bool, rng: np.random.Generator, positions: Optional[np.ndarray] = None,
    width_scale: float = 1.0, uniform_mix: float = 0.08,
) -> np.ndarray:
    """(modes, k) answer distributions of one question. ``positions`` (modes, 2): the modes' places on the cultural
    map; the question then has a random direction on the map and the modes' peaks lie along the answer scale in the
    order of their projections on it (the two extremes at the two ends), so modes close on the map answer alike."""
    width = max(0.55, 0.18 * (k - 1)) * rng.uniform(0.8, 1.3) * width_scale
    if agree:
        peaks = np.full(modes, int(rng.integers(k)))
    elif positions is not None:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        proj = positions @ np.array([np.cos(angle), np.sin(angle)])
        span = proj.max() - proj.min()
        peaks = (proj - proj.min()) / (span if span > 0 else 1.0) * (k - 1)  # continuous places on the scale
    elif k >= modes:
        spread = np.round(np.linspace(0, k - 1, modes)).astype(int)
        peaks = rng.permutation(spread)
    else:
        base = rng.permutation(k)
        peaks = rng.permutation(np.array([base[m % k] for m in range(modes)]))
    grid = np.arange(k)[None, :]
    logits = -((grid - peaks[:, None]) ** 2) / (2 * width**2)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p = (1.0 - uniform_mix) * p + uniform_mix / k
    return p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------------------- metrics


def _normalise(values: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return (values.astype(float) - lo) / max(hi - lo, 1)


def oracle_metrics(records: Iterable[Mapping[str, Any]], truth: Mapping[str, Any]) -> dict[str, Any]:
    """Oracle figures of a set of records (see the module docstring for the formulas).

    Each record needs ``profile_text``, ``question_id``, ``gold_value``, ``scale_min`` and ``scale_max`` (full schema
    records work). ``truth``: the parsed ``truth.json``.
    """
    questions = truth["questions"]
    profiles = truth["profiles"]
    groups: dict[str, tuple[list[str], list[int]]] = {}
    for r in records:
        qid, text = r["question_id"], r["profile_text"]
        if qid not in questions:
            raise ValueError(f"question {qid!r} of record {r.get('id', '?')!r} is not in truth.json")
        if text not in profiles:
            raise ValueError(f"profile {text!r} of record {r.get('id', '?')!r} is not in truth.json")
        texts, golds = groups.setdefault(qid, ([], []))
        texts.append(text)
        golds.append(int(r["gold_value"]))
    if not groups:
        raise ValueError("oracle_metrics needs at least one record")
    n = hits = pop_hits = 0
    exp_hits = 0.0
    emd, emd_exp, pop_emd = [], [], []
    for qid, (texts, golds) in groups.items():
        q = questions[qid]
        lo, hi = int(q["scale_min"]), int(q["scale_max"])
        values = np.asarray(q["option_values"])
        uniq = list(dict.fromkeys(texts))
        pos = {t: i for i, t in enumerate(uniq)}
        table = np.asarray([profiles[t]["distributions"][qid] for t in uniq], dtype=float)  # (U, K)
        dist = table[np.fromiter((pos[t] for t in texts), dtype=np.int64, count=len(texts))]  # (n_q, K)
        gold_v = np.asarray(golds)
        pred_v = values[np.argmax(dist, axis=1)]
        n += len(golds)
        hits += int(np.sum(pred_v == gold_v))
        exp_hits += float(dist.max(axis=1).sum())
        mean_dist = dist.mean(axis=0)
        gold = _normalise(gold_v, lo, hi)
        emd.append(wasserstein_1d(gold, _normalise(pred_v, lo, hi)))
        emd_exp.append(wasserstein_1d(gold, _normalise(values, lo, hi), v_weights=mean_dist))
        pop_value = values[int(np.argmax(mean_dist))]
        pop_hits += int(np.sum(gold_v == pop_value))
        pop_emd.append(wasserstein_1d(gold, _normalise(np.full(len(golds), pop_value), lo, hi)))
    return {
        "n_pairs": n,
        "n_questions": len(groups),
        "accuracy": hits / n,
        "accuracy_expected": exp_hits / n,
        "emd_mean": float(np.mean(emd)),
        "emd_median": float(np.median(emd)),
        "emd_expected_mean": float(np.mean(emd_exp)),
        "emd_expected_median": float(np.median(emd_exp)),
        "population_accuracy": pop_hits / n,
        "population_emd_mean": float(np.mean(pop_emd)),
    }


# --------------------------------------------------------------------------------------------------------- generator


@dataclass
class SyntheticPopulation:
    """Everything :func:`write_synthetic` writes, in memory (tables as lists of string rows)."""

    config: SynthConfig
    question_metadata: dict[str, Any]
    codebook: dict[str, Any]
    answer_adjustment: dict[str, Any]
    demographic_header: list[str]
    value_header: list[str]
    demographic_rows: list[list[str]]
    value_rows: list[list[str]]
    split_of: list[str]  # per participant row
    truth: dict[str, Any]


def _choice(rng: np.random.Generator, n: int, weights: Sequence[float]) -> np.ndarray:
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(p), size=n, p=p / p.sum())


def generate(config: SynthConfig = SynthConfig()) -> SyntheticPopulation:
    """Draw a synthetic population (deterministic for ``config``); see the module docstring for the model."""
    config.validate()
    seed = config.seed
    rng_struct = np.random.default_rng([seed, 1])
    rng_pop = np.random.default_rng([seed, 2])
    rng_ans = np.random.default_rng([seed, 3])
    rng_split = np.random.default_rng([seed, 4])
    P, M = config.participants, config.modes

    # ---- structure: countries, mode logits, questions
    countries = _country_table(config)[: config.countries]
    C = len(countries)
    dominant = _dominant_modes(countries, M, rng_struct)
    country_logits = rng_struct.normal(0.0, 0.4, size=(C, M))
    country_logits[np.arange(C), dominant] += config.country_strength
    religion_logits = np.zeros((len(RELIGIONS), M))
    religion_pref = rng_struct.integers(M, size=len(RELIGIONS))
    if countries[0][4] is not None:
        # with real zones a religion leans to the mode of the zones where it is most common (Orthodox believers to
        # Orthodox Europe's values, ...); a religion no chosen country has keeps its random preference
        share = np.zeros((len(RELIGIONS), M))
        for ci, (_, _, _, mix, _) in enumerate(countries):
            for r, w in mix.items():
                share[RELIGIONS.index(r), dominant[ci]] += w
        religion_pref = np.where(share.sum(1) > 0, share.argmax(1), religion_pref)
    religion_logits[np.arange(len(RELIGIONS)), religion_pref] += config.religion_strength
    young_mode, old_mode = (int(x) for x in rng_struct.choice(M, size=2, replace=False))
    age_logits = np.zeros((len(AGE_GROUPS), M))
    age_logits[[0, 1], young_mode] += config.age_strength
    age_logits[[4, 5], old_mode] += config.age_strength

    mode_positions = None
    if config.mode_layout == "map":
        if countries[0][4] is None:
            raise ValueError("mode_layout 'map' needs country_set 'zones' (invented countries have no map place)")
        # a mode's place: the mean place of the zones whose mode it is
        places = np.zeros((M, 2))
        for m in range(M):
            zones_m = sorted({c[4] for ci, c in enumerate(countries) if dominant[ci] == m})
            places[m] = np.mean([ZONE_MAP[z] for z in zones_m], axis=0) if zones_m else rng_struct.normal(size=2)
        mode_positions = places
    picks = _select_questions(config.questions, rng_struct)
    Q = len(picks)
    n_agree = min(Q, max(1, round(config.agree_fraction * Q))) if Q >= 3 and config.agree_fraction > 0 else 0
    agree = np.zeros(Q, dtype=bool)
    agree[rng_struct.choice(Q, size=n_agree, replace=False)] = True
    qids = [f"Q{j + 1}" for j in range(Q)]
    qinfo = []
    for j, (fam, item) in enumerate(picks):
        labels, body = fam.items[item]
        lo, hi = fam.scale
        values = list(range(lo, hi + 1))
        assert len(values) == len(labels), (fam.key, item)
        qinfo.append((fam, labels, body, values,
                      _mode_distributions(len(values), M, bool(agree[j]), rng_struct, mode_positions,
                                          config.answer_width, config.answer_noise)))

    # ---- participants
    c_idx = rng_pop.integers(C, size=P)
    rel_idx = np.empty(P, dtype=int)
    for ci, (_, _, _, mix, _) in enumerate(countries):
        members = np.flatnonzero(c_idx == ci)
        names = list(mix)
        draw = _choice(rng_pop, len(members), [mix[k] for k in names])
        rel_idx[members] = [RELIGIONS.index(names[d]) for d in draw]
    age_idx = _choice(rng_pop, P, AGE_WEIGHTS)
    gender_idx = _choice(rng_pop, P, (0.49, 0.51))
    edu_idx = _choice(rng_pop, P, EDUCATION_WEIGHTS)
    mar_idx = _choice(rng_pop, P, MARITAL_WEIGHTS)
    emp_idx = _choice(rng_pop, P, EMPLOYMENT_WEIGHTS)
    emp_idx = np.where((age_idx == 5) & (rng_pop.random(P) < 0.7), EMPLOYMENT.index("Retired"), emp_idx)
    emp_idx = np.where((age_idx == 0) & (rng_pop.random(P) < 0.5), EMPLOYMENT.index("Student"), emp_idx)
    mar_idx = np.where((age_idx == 0) & (rng_pop.random(P) < 0.7), MARITAL.index("Single"), mar_idx)
    eth_draw = rng_pop.random(P)
    neighbour = (c_idx + 1 + rng_pop.integers(C - 1, size=P)) % C
    lo_age = np.array([a for a, _ in AGE_RANGES])[age_idx]
    hi_age = np.array([b for _, b in AGE_RANGES])[age_idx]
    years = lo_age + (rng_pop.random(P) * (hi_age - lo_age + 1)).astype(int)
    edu_missing = rng_pop.random(P) < 0.01
    emp_missing = rng_pop.random(P) < 0.01

    logits = country_logits[c_idx] + religion_logits[rel_idx] + age_logits[age_idx]
    mode_probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    mode_probs /= mode_probs.sum(axis=1, keepdims=True)
    modes = (rng_pop.random(P)[:, None] > np.cumsum(mode_probs, axis=1)[:, :-1]).sum(axis=1)

    # ---- answers (P, Q) on the adjusted scale
    answers = np.zeros((P, Q), dtype=int)
    for j, (_, _, _, values, dist) in enumerate(qinfo):
        cdf = np.cumsum(dist, axis=1)[modes]  # (P, K)
        k = (rng_ans.random(P)[:, None] > cdf[:, :-1]).sum(axis=1)
        answers[:, j] = np.asarray(values)[k]
    missing = rng_ans.random((P, Q)) < config.missing_rate
    neg_code = rng_ans.random((P, Q)) < 0.15

    # ---- splits (70/15/15 by default, per participant)
    perm = rng_split.permutation(P)
    n_train = int(config.train_fraction * P)
    n_valid = int(config.valid_fraction * P)
    split_of = np.empty(P, dtype=object)
    split_of[perm[:n_train]] = "train"
    split_of[perm[n_train : n_train + n_valid]] = "valid"
    split_of[perm[n_train + n_valid :]] = "test"

    # ---- tables
    width = max(5, len(str(P)))
    seq = np.zeros(C, dtype=int)
    demographic_rows, value_rows = [], []
    kept = set(config.profile_fields or PROFILE_COLUMNS)
    blank = [DEMOGRAPHIC_COLUMNS.index(c) for c in PROFILE_COLUMNS if c not in kept]
    for i in range(P):
        name, code, demonym, _, _ = countries[c_idx[i]]
        seq[c_idx[i]] += 1
        pid = f"{code:03d}07{seq[c_idx[i]]:0{width}d}"
        if eth_draw[i] < 0.82:
            ethnic = demonym
        elif eth_draw[i] < 0.97:
            ethnic = countries[neighbour[i]][2]
        else:
            ethnic = "Other"
        demographic_rows.append([
            pid, name, AGE_GROUPS[age_idx[i]], GENDERS[gender_idx[i]], str(int(years[i])), MARITAL[mar_idx[i]],
            "No answer" if edu_missing[i] else EDUCATION[edu_idx[i]],
            "" if emp_missing[i] else EMPLOYMENT[emp_idx[i]],
            RELIGIONS[rel_idx[i]], ethnic,
        ])  # fmt: skip
        for col in blank:  # columns outside profile_fields: not asked in this survey
            demographic_rows[-1][col] = ""
        row = [pid]
        for j in range(Q):
            if missing[i, j]:
                row.append("-1" if neg_code[i, j] else "")
            else:
                row.append(str(int(answers[i, j])))
        value_rows.append(row)

    # ---- metadata, codebook, adjustment
    meta: dict[str, Any] = {}
    for col in DEMOGRAPHIC_COLUMNS:
        text, cat = DEMOGRAPHIC_QUESTIONS[col]
        meta[col] = {"question": text, "category": cat, "use_case": "demographic", "answer_scale_min": "",
                     "answer_scale_max": "", "answer_data_type": "non_ordinal"}  # fmt: skip
    codebook: dict[str, Any] = {
        "D_INTERVIEW": {"question": "Interview ID", "question_instruction": "Synthetic interview id: country code, "
                        "07, running number", "type": "objective", "choices": {}},
        "B_COUNTRY": {"question": "Country code (synthetic)", "question_instruction": "", "type": "multiple_choice",
                      "choices": {str(code): name for name, code, _, _, _ in countries}},
        "X003R": {"question": "Age recoded (6 intervals)", "question_instruction": "", "type": "multiple_choice",
                  "choices": {**{str(i + 1): a for i, a in enumerate(AGE_GROUPS)}, "-5": MISSING_CODES["-5"]}},
        "Q260": {"question": "Sex", "question_instruction": "", "type": "multiple_choice",
                 "choices": {"1": "Male", "2": "Female", "-2": MISSING_CODES["-2"]}},
        "Q262": {"question": "Age", "question_instruction": "", "type": "objective", "choices": {"-2": MISSING_CODES["-2"]}},
        "Q273": {"question": "Marital status", "question_instruction": "", "type": "multiple_choice",
                 "choices": {**{str(i + 1): m for i, m in enumerate(MARITAL)}, "-2": MISSING_CODES["-2"]}},
        "Q275": {"question": "Highest educational level", "question_instruction": "", "type": "multiple_choice",
                 "choices": {**{str(i + 1): e for i, e in enumerate(EDUCATION)}, "-1": MISSING_CODES["-1"],
                             "-2": MISSING_CODES["-2"]}},
        "Q279": {"question": "Employment status", "question_instruction": "", "type": "multiple_choice",
                 "choices": {**{str(i + 1): e for i, e in enumerate(EMPLOYMENT)}, "-2": MISSING_CODES["-2"]}},
        "Q289": {"question": "Religious denomination", "question_instruction": "", "type": "multiple_choice",
                 "choices": {**{str(RELIGION_CODES[r]): r for r in RELIGIONS}, "-1": MISSING_CODES["-1"],
                             "-2": MISSING_CODES["-2"]}},
        "Q290": {"question": "Ethnic group", "question_instruction": "", "type": "multiple_choice",
                 "choices": {**{str(code * 1000 + 1): dem for _, code, dem, _, _ in countries}, "999": "Other",
                             "-4": "Not asked in this country"}},
    }  # fmt: skip
    adjustment: dict[str, Any] = {}
    for qid, (fam, labels, body, values, _) in zip(qids, qinfo):
        lo, hi = fam.scale
        meta[qid] = {
            "question": _metadata_text(lo, hi, labels, body),
            "category": fam.category,
            "use_case": "value",
            "answer_scale_min": lo,
            "answer_scale_max": hi,
            "answer_data_type": "ordinal",
        }
        raw = fam.raw_codes or tuple(values)
        choices = {str(c): lab for c, lab in sorted(zip(raw, labels))}
        choices.update(MISSING_CODES)
        codebook[qid] = {"question": body[:1].upper() + body[1:60].rstrip() + ("..." if len(body) > 60 else ""),
                         "question_instruction": "", "type": "multiple_choice", "choices": choices}  # fmt: skip
        if fam.adjustment:
            adjustment[qid] = dict(fam.adjustment)

    # ---- truth per distinct profile (a function of the latent cell (country, religion, age group))
    field_cols = list(WVB_FIELD_MAP)
    col_pos = {c: DEMOGRAPHIC_COLUMNS.index(c) for c in field_cols}
    text_cache: dict[tuple, str] = {}
    texts: list[str] = []
    for row in demographic_rows:
        key = tuple(row[col_pos[c]] for c in field_cols)
        text = text_cache.get(key)
        if text is None:
            text = Profile.from_mapping(dict(zip(field_cols, key)), WVB_FIELD_MAP).to_text()
            text_cache[key] = text
        texts.append(text)
    cell_truth: dict[tuple[int, int, int], dict[str, Any]] = {}
    profiles: dict[str, dict[str, Any]] = {}
    latent_of: dict[str, tuple[int, int, int]] = {}
    for i, text in enumerate(texts):
        key = (int(c_idx[i]), int(rel_idx[i]), int(age_idx[i]))
        if latent_of.setdefault(text, key) != key:  # the truth must be a function of the profile text
            raise AssertionError(f"profile {text!r} maps to two latent cells {latent_of[text]} and {key}")
        if text in profiles:
            continue
        if key not in cell_truth:
            mp = mode_probs[i]
            cell_truth[key] = {
                "mode_probs": np.round(mp, 6).tolist(),
                "distributions": {qid: np.round(mp @ info[4], 6).tolist() for qid, info in zip(qids, qinfo)},
            }
        profiles[text] = cell_truth[key]
    truth_questions = {
        qid: {
            "option_values": values,
            "scale_min": fam.scale[0],
            "scale_max": fam.scale[1],
            "agree": bool(agree[j]),
            "mode_distributions": np.round(dist, 6).tolist(),
        }
        for j, (qid, (fam, _, _, values, dist)) in enumerate(zip(qids, qinfo))
    }
    truth = {
        "format": TRUTH_FORMAT,
        "version": TRUTH_VERSION,
        "config": asdict(config),
        "modes": M,
        "countries": {
            name: {"dominant_mode": int(dominant[ci]), "mode_logits": [round(float(x), 6) for x in country_logits[ci]],
                   "zone": countries[ci][4]}
            for ci, (name, _, _, _, _) in enumerate(countries)
        },
        "religion_preferred_mode": {r: int(religion_pref[k]) for k, r in enumerate(RELIGIONS)},
        "age_modes": {"young (16-34)": young_mode, "old (55+)": old_mode},
        "questions": truth_questions,
        "profiles": profiles,
    }
    # oracle on each split, over every valid (participant, question) pair of that split
    oracle = {}
    for split in ("train", "valid", "test"):
        recs = [
            {"profile_text": texts[i], "question_id": qid, "gold_value": int(answers[i, j]),
             "scale_min": truth_questions[qid]["scale_min"], "scale_max": truth_questions[qid]["scale_max"]}
            for i in np.flatnonzero(split_of == split) for j, qid in enumerate(qids) if not missing[i, j]
        ]  # fmt: skip
        oracle[split] = _rounded(oracle_metrics(recs, truth)) if recs else None
    truth["oracle"] = oracle
    return SyntheticPopulation(
        config=config,
        question_metadata=meta,
        codebook=codebook,
        answer_adjustment=adjustment,
        demographic_header=list(DEMOGRAPHIC_COLUMNS),
        value_header=["D_INTERVIEW"] + qids,
        demographic_rows=demographic_rows,
        value_rows=value_rows,
        split_of=[str(s) for s in split_of],
        truth=truth,
    )


def _rounded(metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _tsv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["\t".join(header)]
    for row in rows:
        if any("\t" in c or "\n" in c for c in row):
            raise AssertionError(f"a synthetic cell contains a tab or newline: {row}")
        lines.append("\t".join(row))
    return "\n".join(lines) + "\n"


def write_synthetic(out: PathLike, config: SynthConfig = SynthConfig(), overwrite: bool = False) -> dict[str, Any]:
    """Generate and write a synthetic population in the WVB layout to ``out`` (atomically). Returns its manifest."""
    pop = generate(config)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        data = tmp / "WorldValuesBench"
        meta_dir = tmp / "dataset_construction"
        for split in ("full", "train", "valid", "test"):
            keep = [i for i, s in enumerate(pop.split_of) if split == "full" or s == split]
            (data / split).mkdir(parents=True, exist_ok=True)
            (data / split / f"{split}_demographic_qa.tsv").write_text(
                _tsv(pop.demographic_header, (pop.demographic_rows[i] for i in keep)), encoding="utf-8"
            )
            (data / split / f"{split}_value_qa.tsv").write_text(
                _tsv(pop.value_header, (pop.value_rows[i] for i in keep)), encoding="utf-8"
            )
        meta_dir.mkdir()
        for name, value in (
            ("question_metadata.json", pop.question_metadata),
            ("codebook.json", pop.codebook),
            ("answer_adjustment.json", pop.answer_adjustment),
        ):
            (meta_dir / name).write_text(dumps(value, indent=4) + "\n", encoding="utf-8")
        (tmp / "truth.json").write_text(dumps(pop.truth) + "\n", encoding="utf-8")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        counts = {s: pop.split_of.count(s) for s in ("train", "valid", "test")}
        manifest = {
            "format": "cuma-synthetic-wvb",
            "format_version": 1,
            "config": asdict(config),
            "seed": config.seed,
            "counts": {
                "participants": {"full": len(pop.split_of), **counts},
                "questions": len(pop.value_header) - 1,
                "distinct_profiles": len(pop.truth["profiles"]),
                "recoded_questions": sorted(pop.answer_adjustment, key=lambda q: int(q[1:])),
                "agreeing_questions": [q for q, v in pop.truth["questions"].items() if v["agree"]],
            },
            "oracle": pop.truth["oracle"],
            "files": {str(p.relative_to(tmp)): sha256_file(p) for p in files},
            "versions": package_versions(("cuma", "numpy")),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
    return manifest


def load_truth(path: PathLike) -> dict[str, Any]:
    """Read ``truth.json`` (a file, or a folder holding one) and check its format."""
    p = Path(path)
    if p.is_dir():
        p = p / "truth.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"no truth.json at {str(p)!r} (only synthetic data written by `cuma data synth` has one)"
        )
    value = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(value, dict) or value.get("format") != TRUTH_FORMAT:
        found = value.get("format") if isinstance(value, dict) else None
        raise ValueError(f"{p}: expected a {TRUTH_FORMAT!r} file, got format {found!r}")
    return value
