"""kalm-mini, the embedded default model: loading, ratios, cached-passage independence, simple cases.

Uses only the shipped weights and the installed encoder package (no network, no ../shared).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from kalm_rag import Reranker
from kalm_rag.models.mini import EMBEDDED_DIR, MODEL_TYPE, MiniBackend
from kalm_rag.padding import right_pad
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
    # exact storage: these tests compare with plain transformers/torch, which a storage codec would blur
    return Reranker.from_pretrained(device="cpu", dtype="float32", base_ratio=1, storage="float32")


def test_default_is_kalm_mini(rr: Reranker) -> None:
    assert rr.backend.family == MODEL_TYPE
    assert isinstance(rr.backend, MiniBackend)
    assert rr.backend.weights_id.startswith("kalm-mini-")
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    assert config["model_type"] == MODEL_TYPE
    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size <= 25 * 10**6
    assert (EMBEDDED_DIR / "README.md").is_file()


def minilm_embeddings(texts: list[str], *, drop_cls: bool = False) -> torch.Tensor:
    """Mean-pooled all-MiniLM-L6-v2 embeddings ``(N, d)`` with plain transformers calls (the reference)."""
    from transformers import AutoModel, AutoTokenizer

    from kalm_rag.models.mini import MiniConfig, encoder_dir

    path = encoder_dir(MiniConfig().encoder_spec)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state  # (N, T, d)
    m = enc["attention_mask"].unsqueeze(-1).float()  # (N, T, 1)
    if drop_cls:
        h, m = h[:, 1:], m[:, 1:]
    return (h * m).sum(1) / m.sum(1)


def test_shipped_score_is_the_decoder_head_plus_the_encoder_cosine_skip(rr: Reranker) -> None:
    # With the head's weight zeroed the decoder's layers no longer reach the score: what is left must be the
    # documented skip, score_scale * (head bias + cosine_weight * MiniLM cosine) + score_bias, computed here
    # with plain transformers calls (query: its tokens and [SEP], the [CLS] dropped; passage: all its states).
    q = "What is the capital of France?"
    passages = PASSAGES[:4]  # short: one window, so ratio 1 holds every token state
    dec, cfg = rr.backend.decoder, rr.backend.config
    assert dec.cosine_weight.item() > 1.0  # the skip is in use, on a scale where it matters
    head = dec.head
    saved = head.weight.detach().clone()
    try:
        with torch.no_grad():
            head.weight.zero_()
        got = torch.tensor(rr.score(q, passages, ratio=1, return_margin=True))
    finally:
        with torch.no_grad():
            head.weight.copy_(saved)
    query = minilm_embeddings([q], drop_cls=True)  # (1, d)
    cos = torch.nn.functional.cosine_similarity(query, minilm_embeddings(passages), dim=-1)  # (4,)
    want = cfg.score_scale * (head.bias.item() + dec.cosine_weight.item() * cos) + cfg.score_bias
    assert torch.allclose(got, want, atol=1e-3), (got, want)
    # the decoder's layers are more than a correction of the cosine: alone, they still find the answer
    with torch.no_grad():
        saved_w = dec.cosine_weight.detach().clone()
        dec.cosine_weight.zero_()
    try:
        decoder_alone = rr.score(q, PASSAGES, ratio=4, return_margin=True)
    finally:
        with torch.no_grad():
            dec.cosine_weight.copy_(saved_w)
    assert max(decoder_alone) - min(decoder_alone) > 0.5
    assert decoder_alone[0] == max(decoder_alone)


def test_named_load_matches_default(rr: Reranker) -> None:
    named = Reranker.from_pretrained("kalm-mini", device="cpu", dtype="float32", base_ratio=1, storage="float32")
    assert named.backend.weights_id == rr.backend.weights_id
    q = "What is the capital of France?"
    assert named.score(q, PASSAGES) == pytest.approx(rr.score(q, PASSAGES), abs=1e-6)


def test_loads_from_folder(rr: Reranker) -> None:
    other = Reranker.from_pretrained(str(EMBEDDED_DIR), device="cpu", dtype="float32")
    assert other.backend.family == MODEL_TYPE


def test_long_passages_are_read_in_windows(rr: Reranker) -> None:
    backend = rr.backend
    ids = backend.tokenize_passages(["word " * 2000], 1024)[0]
    assert len(ids) == 1024 and rr.max_passage_tokens == 1024
    windows = [ids[i : i + 256] for i in range(0, 1024, 256)]  # four whole windows, each framed alone
    assert all(w[0] == backend.cls_id and w[-1] == backend.sep_id and len(w) == 256 for w in windows)
    assert len(backend.tokenize_passages(["word " * 2000], 64)[0]) == 64
    short = backend.tokenize_passages(["Paris is in France."], 1024)[0]
    assert short[0] == backend.cls_id and short[-1] == backend.sep_id and short.count(backend.cls_id) == 1


def test_each_window_is_encoded_alone(rr: Reranker) -> None:
    """The encoder states of a long passage equal plain transformers calls on each window (linear cost)."""
    backend = rr.backend
    ids = backend.tokenize_passages([" ".join(f"token{i}" for i in range(500))], 1024)[0]
    assert len(ids) > 256
    states = MiniBackend.encode(backend, *right_pad([ids], 0))[0]  # (n, d)
    for start in range(0, len(ids), 256):
        window = torch.tensor([ids[start : start + 256]])
        with torch.no_grad():
            want = backend.encoder(input_ids=window, attention_mask=torch.ones_like(window)).last_hidden_state[0]
        torch.testing.assert_close(states[start : start + window.shape[1]], want, atol=1e-4, rtol=1e-4)


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
    alone = MiniBackend.encode(rr.backend, *right_pad([rr.backend.tokenize_passages([PASSAGES[0]], 256)[0]], 0))
    ids = rr.backend.tokenize_passages(PASSAGES, 256)
    batched = MiniBackend.encode(rr.backend, *right_pad(ids, 0))
    n = len(ids[0])
    torch.testing.assert_close(batched[0, :n], alone[0, :n], atol=1e-5, rtol=1e-5)


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
        "Geographers usually count seven continents: Africa, Antarctica, Asia, Australia, Europe, "
        "North America and South America.",
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
        "The Nile, flowing about 6,650 kilometres through north-eastern Africa, is usually named the "
        "longest river in the world.",
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
# (question, ratio) pairs the shipped checkpoint gets wrong (0.1 missed the plants case at every ratio, 0.3 none;
# 1.0 misses it at every ratio again: "Many animals eat plants as their main food." comes first).
KNOWN_MISSES: set[tuple[str, int]] = {("How do plants make their food?", r) for r in (1, 4, 16)}


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


# Passages that repeat the question (or its words) next to text that does not answer it: the "query echo" a
# reranker trained on word overlap ranks first. Hand-written; not training data.
ECHO_CASES = [
    (
        "What is the capital of France?",
        "Paris is the capital and largest city of France.",
        "What is the capital of France? This is a question many tourists ask before their first trip to Europe.",
    ),
    (
        "When did World War II end?",
        "World War II ended in 1945, with Germany surrendering in May and Japan in September.",
        "When did World War II end? Historians have written many books about the war and its causes.",
    ),
    (
        "Who wrote Pride and Prejudice?",
        "Pride and Prejudice is an 1813 novel by Jane Austen.",
        "Who wrote Pride and Prejudice? Many students are asked this question in their literature exams.",
    ),
    (
        "How many legs does a spider have?",
        "Spiders have eight legs, which sets them apart from insects, which have six.",
        "How many legs does a spider have? Spiders are found on every continent except Antarctica.",
    ),
    (
        "What is the boiling point of water?",
        "At sea level, water boils at 100 degrees Celsius (212 degrees Fahrenheit).",
        "What is the boiling point of water? Water covers about 71 percent of the Earth's surface.",
    ),
    (
        "Who painted the Mona Lisa?",
        "The Mona Lisa was painted by Leonardo da Vinci in the early sixteenth century.",
        "Who painted the Mona Lisa? The painting hangs in the Louvre and draws millions of visitors every year.",
    ),
    (
        "What is the largest planet in the solar system?",
        "Jupiter is the largest planet in the solar system, more than twice as massive as all the others combined.",
        "What is the largest planet in the solar system? Our solar system formed about 4.6 billion years ago.",
    ),
    (
        "How do vaccines work?",
        "Vaccines train the immune system to recognise a pathogen, so that it can respond quickly to a "
        "later infection.",
        "How do vaccines work? How vaccines work is a topic that comes up often in the news and among friends.",
    ),
    (
        "What causes the seasons on Earth?",
        "The seasons are caused by the tilt of Earth's axis, which changes how directly sunlight strikes "
        "each hemisphere.",
        "What causes the seasons on Earth? Spring, summer, autumn and winter each have their own festivals.",
    ),
    (
        "Who was the first person to walk on the Moon?",
        "Neil Armstrong became the first person to walk on the Moon on 20 July 1969.",
        "Who was the first person to walk on the Moon? The Moon is Earth's only natural satellite.",
    ),
    (
        "What is the chemical symbol for gold?",
        "The chemical symbol for gold is Au, from the Latin word aurum.",
        "What is the chemical symbol for gold? Gold has been used for jewellery for thousands of years.",
    ),
    (
        "How long does it take light from the Sun to reach Earth?",
        "Sunlight takes about 8 minutes and 20 seconds to travel from the Sun to Earth.",
        "How long does it take light from the Sun to reach Earth? This question puzzles many schoolchildren.",
    ),
    (
        "What is the tallest mountain in the world?",
        "Mount Everest, at 8,849 metres above sea level, is the tallest mountain in the world.",
        "What is the tallest mountain in the world? Mountain climbing has become a popular hobby in many countries.",
    ),
    (
        "What do bees make?",
        "Bees make honey from the nectar of flowers, and beeswax to build their combs.",
        "What do bees make? This question appears in many children's quiz books about insects.",
    ),
    (
        "Which language has the most native speakers?",
        "Mandarin Chinese has the most native speakers of any language, about 940 million people.",
        "Which language has the most native speakers? Languages change over time as people move and trade.",
    ),
    (
        "What is the speed of sound in air?",
        "Sound travels through dry air at about 343 metres per second at 20 degrees Celsius.",
        "What is the speed of sound in air? The speed of sound in air is a common topic in physics classes.",
    ),
    (
        "Who discovered penicillin?",
        "Penicillin was discovered by Alexander Fleming in 1928 at St Mary's Hospital in London.",
        "Who discovered penicillin? Who discovered penicillin is one of the most searched questions about medicine.",
    ),
    (
        "What is the main ingredient of guacamole?",
        "Guacamole is made mainly from mashed avocado, with lime juice, onion and salt.",
        "What is the main ingredient of guacamole? Guacamole is served at many parties and restaurants.",
    ),
    (
        "How many bones are in the adult human body?",
        "An adult human skeleton has 206 bones.",
        "How many bones are in the adult human body? The human body is a complex system of organs and tissues.",
    ),
    (
        "What year did the Berlin Wall fall?",
        "The Berlin Wall fell on 9 November 1989, when the border crossings were opened.",
        "What year did the Berlin Wall fall? Berlin is the capital of Germany and its largest city.",
    ),
]


# kalm-mini 0.3 (the embedded weights until 1.0 lands) was never trained on echoes or passages over 256 tokens.
# The echo cases kalm-mini 1.1 still loses (14 of the 20 pass).
ECHO_MISSES = {
    "What is the capital of France?",
    "Who wrote Pride and Prejudice?",
    "Which language has the most native speakers?",
    "What is the speed of sound in air?",
    "How many bones are in the adult human body?",
    "What is the chemical symbol for gold?",
}


def echo_params() -> list:
    miss = pytest.mark.xfail(strict=False, reason="kalm-mini 1.1 ranks this echo above the answer")
    return [pytest.param(*case, marks=[miss] if case[0] in ECHO_MISSES else [], id=case[0]) for case in ECHO_CASES]


@pytest.mark.parametrize(("query", "answer", "echo"), echo_params())
def test_the_answer_beats_an_echo_of_the_question(rr: Reranker, query: str, answer: str, echo: str) -> None:
    answer_score, echo_score = rr.score(query, [answer, echo])
    assert answer_score > echo_score, (answer_score, echo_score)


FILLER = (
    "The town council met on Tuesday to discuss the new bus timetable. Several residents asked for more evening "
    "services, and the council agreed to study the idea. The library will extend its opening hours in the summer. "
    "A new bakery opened on the high street last month and has already become popular with commuters. "
)


@pytest.mark.parametrize("ratio", [1, 4, 16])
def test_an_answer_at_the_end_of_a_long_passage_is_found(rr: Reranker, ratio: int) -> None:
    query = "When did the Eiffel Tower open?"
    answer = "The Eiffel Tower opened to the public on 31 March 1889, for the World's Fair in Paris. "
    filler = FILLER * 13  # about 700 words of text that does not answer the question
    assert 650 < len(filler.split()) < 750
    at_start, at_end, neither = rr.score(query, [answer + filler, filler + answer, filler + filler[:200]], ratio=ratio)
    assert at_end > neither and at_start > neither
    assert at_end > 0.5 * at_start  # found as well as at the start, not merely above zero


def test_a_passage_past_the_token_limit_is_cut_with_a_warning(rr: Reranker, caplog: pytest.LogCaptureFixture) -> None:
    short = Reranker(rr.backend, max_passage_tokens=64)
    before = rr.backend.passages_cut
    with caplog.at_level(logging.DEBUG, logger="kalm_rag.models.mini.backend"):
        short.encode(["A short passage that fits.", FILLER * 2], show_progress_bar=False)
    assert rr.backend.passages_cut == before + 1  # the long one only
    assert "1 passage(s) longer than max_passage_tokens=64 were cut" in caplog.text
    fits = rr.backend.tokenize_passages([" ".join(["word"] * 62)], 64)[0]  # 62 tokens + [CLS] [SEP]: not cut
    assert len(fits) == 64 and rr.backend.passages_cut == before + 1
