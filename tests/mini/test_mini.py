"""kalm-mini, the embedded default model: loading, ratios, cached-passage independence, simple cases.

Uses only the shipped weights and the installed encoder package (no network, no ../shared).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from kalm_rag import Reranker
from kalm_rag.models.mini import EMBEDDED_DIR, MODEL_TYPE, MiniBackend
from kalm_rag.store import passage_key

PASSAGES = [
    "Paris is the capital and largest city of France, on the river Seine.",
    "France is famous for its cheese, and its capital hosts many museums.",
    "The capital of Australia is Canberra, not Sydney.",
    "Lyon is a French city known for its cuisine.",
    " ".join(["A long passage about the history of European rivers and the towns built along them."] * 12),
]


@pytest.fixture(scope="module")
def rr() -> Reranker:
    torch.manual_seed(0)
    return Reranker.from_pretrained(device="cpu", dtype="float32")


def test_default_is_kalm_mini(rr: Reranker) -> None:
    assert rr.backend.family == MODEL_TYPE
    assert isinstance(rr.backend, MiniBackend)
    assert rr.backend.weights_id.startswith("kalm-mini-")
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE
    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size <= 25 * 10**6
    assert (EMBEDDED_DIR / "README.md").is_file()


def test_named_load_matches_default(rr: Reranker) -> None:
    named = Reranker.from_pretrained("kalm-mini", device="cpu", dtype="float32")
    assert named.backend.weights_id == rr.backend.weights_id
    q = "What is the capital of France?"
    assert named.score(q, PASSAGES) == pytest.approx(rr.score(q, PASSAGES), abs=1e-6)


def test_loads_from_folder(rr: Reranker) -> None:
    other = Reranker.from_pretrained(str(EMBEDDED_DIR), device="cpu", dtype="float32")
    assert other.backend.family == MODEL_TYPE


def test_passage_tokens_capped_at_256(rr: Reranker) -> None:
    ids = rr.backend.tokenize_passages(["word " * 2000], 1024)[0]
    assert len(ids) == 256
    assert len(rr.backend.tokenize_passages(["word " * 2000], 64)[0]) == 64


@pytest.mark.parametrize("ratio", list(range(1, 33)))
def test_every_ratio_gives_finite_scores(rr: Reranker, ratio: int) -> None:
    scores = rr.score("What is the capital of France?", PASSAGES, ratio=ratio)
    assert len(scores) == len(PASSAGES)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)


def test_pooled_shapes(rr: Reranker) -> None:
    rr.encode(PASSAGES)
    entry = rr.store.get_many(rr.namespace, [passage_key(PASSAGES[4])])[0]
    n = len(rr.backend.tokenize_passages([PASSAGES[4]], rr.max_passage_tokens)[0])
    assert entry.vectors.shape == (n, rr.backend.hidden_size)  # base ratio 1: one vector per token
    assert int(entry.counts.sum()) == n


def test_cached_passages_do_not_depend_on_queries(rr: Reranker) -> None:
    rr.encode(PASSAGES)
    keys = [passage_key(p) for p in PASSAGES]
    before = [e.vectors.clone() for e in rr.store.get_many(rr.namespace, keys)]
    for q in ["What is the capital of France?", "Which river flows through Lyon?", "cheese"]:
        rr.score(q, PASSAGES, ratio=4)
    after = [e.vectors for e in rr.store.get_many(rr.namespace, keys)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert rr.counters["encoded_passages"] == len(PASSAGES)  # nothing re-encoded per query
    # the encoder output of a passage is the same alone or batched with others (padding is masked)
    alone = MiniBackend.encode(rr.backend, *_pad([rr.backend.tokenize_passages([PASSAGES[0]], 256)[0]]))
    ids = rr.backend.tokenize_passages(PASSAGES, 256)
    batched = MiniBackend.encode(rr.backend, *_pad(ids))
    n = len(ids[0])
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), n), dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def test_scores_do_not_depend_on_batch_composition(rr: Reranker) -> None:
    q = "What is the capital of France?"
    together = rr.score(q, PASSAGES, ratio=4)
    alone = [rr.score(q, [p], ratio=4)[0] for p in PASSAGES]
    assert together == pytest.approx(alone, abs=1e-5)
    rr.batch_size, old = 2, rr.batch_size
    try:
        assert rr.score(q, PASSAGES, ratio=4) == pytest.approx(together, abs=1e-5)
    finally:
        rr.batch_size = old


# Simple general-knowledge questions; the distractors share the question's words but do not answer it.
CASES = [
    pytest.param(
        'What is the capital of France?',
        'Paris is the capital and largest city of France, on the river Seine.',
        [
            'France is famous for its cheese, and its capital hosts many museums.',
            'The capital of Australia is Canberra, not Sydney.',
            'Lyon is a French city known for its cuisine and its capital role in the silk trade.',
        ],
        id='What is the capital of France?'),
    pytest.param(
        'How do plants make their food?',
        'Photosynthesis lets plants turn light, water and carbon dioxide into glucose and oxygen.',
        [
            'Plants in a garden need water and food to grow well.',
            'Many animals eat plants as their main food.',
        ],
        id='How do plants make their food?'),
    pytest.param(
        'Who wrote Romeo and Juliet?',
        'Romeo and Juliet is a tragedy written by William Shakespeare early in his career.',
        [
            'Romeo and Juliet have been staged in many cities and films.',
            'Juliet is a common name for girls in English-speaking countries.',
        ],
        id='Who wrote Romeo and Juliet?'),
    pytest.param(
        'How many legs does a spider have?',
        'Spiders are arachnids with eight legs and a body in two segments.',
        [
            'A spider spins its web from silk made in its body.',
            'Most tables and chairs have four legs.',
        ],
        id='How many legs does a spider have?'),
    pytest.param(
        'Who painted the Mona Lisa?',
        'Leonardo da Vinci painted the Mona Lisa in the early sixteenth century.',
        [
            'The Mona Lisa hangs in the Louvre in Paris and draws millions of visitors.',
            'Lisa painted her kitchen a bright yellow last summer.',
        ],
        id='Who painted the Mona Lisa?'),
    pytest.param(
        'At what temperature does water boil at sea level?',
        'At sea level, pure water boils at 100 degrees Celsius, or 212 degrees Fahrenheit.',
        [
            'Sea water is salty and covers most of the surface of the Earth.',
            'Drinking enough water matters more when the temperature is high.',
        ],
        id='At what temperature does water boil at sea level?'),
    pytest.param(
        'What gas do people breathe out?',
        'When we exhale, our lungs release carbon dioxide made by our cells.',
        [
            'Many people heat their homes with natural gas.',
            'People breathe faster when they run up the stairs.',
        ],
        id='What gas do people breathe out?'),
    pytest.param(
        'What is the largest planet in the Solar System?',
        'Jupiter is the biggest planet in the Solar System, more than twice as massive as all the others combined.',
        [
            'The Solar System formed about 4.6 billion years ago from a cloud of gas.',
            'Pluto was called the ninth planet until 2006.',
        ],
        id='What is the largest planet in the Solar System?'),
    pytest.param(
        'Who was the first person to walk on the Moon?',
        'Neil Armstrong became the first human to step onto the lunar surface in July 1969.',
        [
            'The Moon is the only natural satellite of the Earth.',
            "Walking every day is good for a person's health.",
        ],
        id='Who was the first person to walk on the Moon?'),
    pytest.param(
        'Why is the sky blue?',
        'Air molecules scatter short blue wavelengths of sunlight much more than red ones, so the daytime sky looks blue.',
        [
            'Blue is a popular colour for sports team shirts.',
            'The sky was full of dark clouds before the storm.',
        ],
        id='Why is the sky blue?'),
]

@pytest.mark.parametrize("ratio", [1, 4, 16])
@pytest.mark.parametrize(("query", "answer", "distractors"), CASES)
def test_prefers_the_answer(rr: Reranker, ratio: int, query: str, answer: str, distractors: list[str]) -> None:
    ranked = rr.rerank(query, distractors + [answer], ratio=ratio)
    assert ranked[0].text == answer
