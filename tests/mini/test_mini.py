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


def test_shipped_checkpoint_is_fbnl_without_a_similarity_term(rr: Reranker) -> None:
    config = rr.backend.config
    assert not config.bi_encoder_prior and not hasattr(rr.backend.decoder, "prior")
    assert config.query_input == "encoder" and config.relevance_attention and config.passage_summary
    # the score comes from the head alone: zeroing it leaves nothing that compares query and passage
    q = "What is the capital of France?"
    head = rr.backend.decoder.head
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
        margins = rr.score(q, PASSAGES, return_margin=True)
        assert max(margins) - min(margins) == 0.0
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)


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
# Neither set is training data; both were used to compare candidate checkpoints.
CASES = [
    (
        "What is the capital of France?",
        "Paris is the capital and largest city of France, on the river Seine.",
        [
            "France is famous for its cheese, and its capital hosts many museums.",
            "The capital of Australia is Canberra, not Sydney.",
            "Lyon is a French city known for its cuisine and its capital role in the silk trade.",
        ],
    ),
    (
        "How do plants make their food?",
        "Photosynthesis lets plants turn light, water and carbon dioxide into glucose and oxygen.",
        [
            "Plants in a garden need water and food to grow well.",
            "Many animals eat plants as their main food.",
        ],
    ),
    (
        "Who wrote Romeo and Juliet?",
        "Romeo and Juliet is a tragedy written by William Shakespeare early in his career.",
        [
            "Romeo and Juliet have been staged in many cities and films.",
            "Juliet is a common name for girls in English-speaking countries.",
        ],
    ),
    (
        "How many legs does a spider have?",
        "Spiders are arachnids with eight legs and a body in two segments.",
        [
            "A spider spins its web from silk made in its body.",
            "Most tables and chairs have four legs.",
        ],
    ),
    (
        "Who painted the Mona Lisa?",
        "Leonardo da Vinci painted the Mona Lisa in the early sixteenth century.",
        [
            "The Mona Lisa hangs in the Louvre in Paris and draws millions of visitors.",
            "Lisa painted her kitchen a bright yellow last summer.",
        ],
    ),
    (
        "At what temperature does water boil at sea level?",
        "At sea level, pure water boils at 100 degrees Celsius, or 212 degrees Fahrenheit.",
        [
            "Sea water is salty and covers most of the surface of the Earth.",
            "Drinking enough water matters more when the temperature is high.",
        ],
    ),
    (
        "What gas do people breathe out?",
        "When we exhale, our lungs release carbon dioxide made by our cells.",
        [
            "Many people heat their homes with natural gas.",
            "People breathe faster when they run up the stairs.",
        ],
    ),
    (
        "What is the largest planet in the Solar System?",
        "Jupiter is the biggest planet in the Solar System, more than twice as massive as all the others combined.",
        [
            "The Solar System formed about 4.6 billion years ago from a cloud of gas.",
            "Pluto was called the ninth planet until 2006.",
        ],
    ),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong became the first human to step onto the lunar surface in July 1969.",
        [
            "The Moon is the only natural satellite of the Earth.",
            "Walking every day is good for a person's health.",
        ],
    ),
    (
        "Why is the sky blue?",
        "Air molecules scatter short blue wavelengths of sunlight much more than red ones, so the daytime "
        "sky looks blue.",
        [
            "Blue is a popular colour for sports team shirts.",
            "The sky was full of dark clouds before the storm.",
        ],
    ),
    (
        "What is the chemical symbol for gold?",
        "The chemical symbol for gold is Au, from the Latin word aurum.",
        [
            "Gold medals are given to the winners of Olympic events.",
            "Many chemical elements are named after the scientists who found them.",
        ],
    ),
    (
        "How many continents are there?",
        "Geographers usually count seven continents: Africa, Antarctica, Asia, Australia, Europe, North "
        "America and South America.",
        [
            "The continent of Africa has more than fifty countries.",
            "There are many ways to count the number of stars in the sky.",
        ],
    ),
    (
        "Who invented the telephone?",
        "Alexander Graham Bell was awarded the first patent for the telephone in 1876.",
        [
            "Most people now carry a mobile telephone wherever they go.",
            "The telephone rang three times before anyone answered.",
        ],
    ),
    (
        "What is the longest river in the world?",
        "The Nile, flowing about 6,650 kilometres through north-eastern Africa, is usually named the longest "
        "river in the world.",
        [
            "Rivers provide water for farming and drinking in many parts of the world.",
            "The world's longest bridge crosses a river in China.",
        ],
    ),
    (
        "What do bees make?",
        "Honey bees collect nectar from flowers and turn it into honey, which they store in wax combs.",
        [
            "Bees are insects with six legs and four wings.",
            "Some people are afraid of bees because their stings hurt.",
        ],
    ),
    (
        "When did World War II end?",
        "World War II ended in 1945, with Germany surrendering in May and Japan in September.",
        [
            "World War I began in 1914 after the assassination of Archduke Franz Ferdinand.",
            "The end of the war brought many soldiers home to their families.",
        ],
    ),
    (
        "What is the freezing point of water?",
        "Pure water freezes at 0 degrees Celsius, which is 32 degrees Fahrenheit.",
        [
            "Water covers about seventy percent of the Earth's surface.",
            "A freezer keeps food cold so that it lasts longer.",
        ],
    ),
    (
        "What is the hardest natural substance?",
        "Diamond is the hardest naturally occurring material, rating 10 on the Mohs scale.",
        [
            "Natural light is better for growing indoor plants.",
            "It is hard to find work in some small towns.",
        ],
    ),
    (
        "Which organ pumps blood through the body?",
        "The heart is a muscular organ that pumps blood through the blood vessels of the body.",
        [
            "Blood donors give about half a litre of blood at a time.",
            "The organ in the church was built in the eighteenth century.",
        ],
    ),
    (
        "What language is spoken in Brazil?",
        "Portuguese is the official and most widely spoken language of Brazil.",
        [
            "Brazil is the largest country in South America.",
            "Learning a second language helps children at school.",
        ],
    ),
]
# (question, ratio) pairs the shipped checkpoint gets wrong (0.1 missed the plants case at every ratio; 0.3 none).
KNOWN_MISSES: set[tuple[str, int]] = set()


def case_params() -> list:
    params = []
    for query, answer, distractors in CASES:
        for ratio in (1, 4, 16):
            marks = (
                [pytest.mark.xfail(strict=False, reason="known miss of the shipped kalm-mini")]
                if (query, ratio) in KNOWN_MISSES
                else []
            )
            params.append(pytest.param(query, answer, distractors, ratio, marks=marks, id=f"{query}-r{ratio}"))
    return params


@pytest.mark.parametrize(("query", "answer", "distractors", "ratio"), case_params())
def test_prefers_the_answer(rr: Reranker, query: str, answer: str, distractors: list[str], ratio: int) -> None:
    ranked = rr.rerank(query, distractors + [answer], ratio=ratio)
    assert ranked[0].text == answer
