"""kalm-mini training pieces: the loss, the bi-encoder teacher, the general-knowledge pairs, a short run.

The teacher is checked against plain transformers (all-MiniLM-L6-v2 with mean pooling), not against itself.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kalm_rag import Reranker
from kalm_rag.models.mini import MiniBackend, MiniConfig, MiniDecoder, encoder_dir, with_summary_window
from kalm_rag.pooling import mep_pool
from kalm_rag.train.cache import EncodingCache
from kalm_rag.train.data import DevQuery, Example, TrainingData, wiki_examples, wiki_queries, wiki_summaries_file
from kalm_rag.train.trainer import BiEncoderTeacher, MiniTask, TrainConfig, group_loss, train

ARTICLES = {
    "Photosynthesis": (
        "Photosynthesis",
        "Biological process that converts light into chemical energy",
        "Biology and health sciences",
        "Photosynthesis is the process by which plants, algae and some bacteria turn light, water and "
        "carbon dioxide into glucose and oxygen.",
    ),
    "Herbivore": (
        "Herbivore",
        "Animal that eats plants",
        "Biology and health sciences",
        "A herbivore is an animal anatomically and physiologically adapted to eating plant material, for "
        "example foliage, for the main component of its diet. Photosynthesis in plants feeds them indirectly.",
    ),
    "Mercury (planet)": (
        "Mercury (planet)",
        "Smallest planet in the Solar System",
        "Physical sciences",
        "Mercury is the first planet from the Sun and the smallest in the Solar System, orbiting in 88 days.",
    ),
    "Marie Curie": (
        "Marie Curie",
        "Physicist and chemist (1867-1934)",
        "People",
        "Marie Curie was a Polish and naturalised-French physicist and chemist who conducted pioneering research "
        "on radioactivity and won two Nobel Prizes.",
    ),
}


@pytest.fixture(scope="module")
def backend() -> MiniBackend:
    torch.manual_seed(0)
    return MiniBackend.fresh(MiniConfig(num_layers=2, init_layers=[4, 5]))


def write_summaries(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                k: {"title": t, "description": d, "topic": topic, "extract": e}
                for k, (t, d, topic, e) in ARTICLES.items()
            }
        )
    )
    return path


def test_distillation_term_vanishes_when_the_student_matches_the_teacher() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    plain = group_loss(logits)
    same = group_loss(logits, logits + 3.0, distill=1.0)  # a shift leaves the softmax unchanged
    other = group_loss(logits, torch.tensor([[-1.0, 0.5, 2.0], [0.3, 0.1, 0.2]]), distill=1.0)
    assert torch.allclose(plain, same, atol=1e-6)
    assert other > plain + 0.1


def test_wiki_queries_name_or_describe_the_subject() -> None:
    assert wiki_queries("Mercury (planet)", "Smallest planet in the Solar System", "Physical sciences") == [
        "What is Mercury?",
        "Smallest planet in the Solar System",
    ]
    assert wiki_queries("Marie Curie", "physicist and chemist", "People") == [
        "Who was Marie Curie?",
        "Physicist and chemist",
    ]
    assert wiki_queries("Hat", "", "Everyday life") == ["What is Hat?"]


def test_wiki_examples_pair_each_query_with_its_own_summary(tmp_path: Path) -> None:
    examples = wiki_examples(write_summaries(tmp_path / "summaries.json"), negatives=3, limit=None)
    assert len(examples) == 2 * len(ARTICLES)
    by_query = {ex.query: ex for ex in examples}
    photo = by_query["What is Photosynthesis?"]
    assert photo.pos == [ARTICLES["Photosynthesis"][3]]
    assert photo.pos[0] not in photo.neg
    assert photo.neg[0] == ARTICLES["Herbivore"][3]  # mentions photosynthesis without being about it
    assert all(ex.source == "wiki" for ex in examples)


def test_the_installed_wiki_summaries_are_found() -> None:
    path = wiki_summaries_file()
    data = json.loads(path.read_text())
    assert len(data) > 5000 and all("extract" in v for v in list(data.values())[:50])


def test_teacher_is_minilm_cosine(backend: MiniBackend, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    cache = EncodingCache(tmp_path, backend)
    passages = [[ARTICLES["Photosynthesis"][3], ARTICLES["Mercury (planet)"][3]]]
    cache.ensure(passages[0])
    got = BiEncoderTeacher(backend, cache, scale=20.0).logits(["How do plants make food?"], passages)

    tok = AutoTokenizer.from_pretrained(str(encoder_dir(MiniConfig())))
    model = AutoModel.from_pretrained(str(encoder_dir(MiniConfig()))).eval()

    def embed(texts: list[str]) -> torch.Tensor:  # sentence-transformers' mean pooling
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    want = 20.0 * embed(["How do plants make food?"]) @ embed(passages[0]).T
    assert got.shape == (1, 2)
    assert torch.allclose(got, want, atol=2e-2)  # the cache keeps fp16 token states
    assert got[0, 0] > got[0, 1]


def test_a_short_run_trains_saves_and_loads(backend: MiniBackend, tmp_path: Path) -> None:
    texts = [v[3] for v in ARTICLES.values()]
    examples = [
        Example(q, [texts[i]], [t for j, t in enumerate(texts) if j != i], "wiki")
        for i, q in enumerate(
            [
                "How do plants make food?",
                "What do herbivores eat?",
                "Which planet is closest to the Sun?",
                "Who discovered radioactivity?",
            ]
        )
    ]
    dev = [DevQuery("Which planet is smallest?", texts, [0, 0, 1, 0], "wiki")]
    cache = EncodingCache(tmp_path / "cache", backend)
    cache.ensure(texts)
    cfg = TrainConfig(
        steps=3,
        groups_per_step=2,
        negatives=2,
        random_negatives=1,
        ratios=[4],
        extra_ratios=[1, 16],
        warmup=1,
        eval_every=3,
        source_weights={"wiki": 1.0},
    )
    before = {k: v.clone() for k, v in backend.decoder.state_dict().items()}
    summary = train(
        MiniTask(backend, cache, cfg),
        TrainingData(examples, dev),
        cfg,
        tmp_path / "run",
        BiEncoderTeacher(backend, cache, scale=cfg.teacher_scale),
    )
    assert summary["steps_run"] == 3 and 0.0 <= summary["best_dev_ndcg10"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in backend.decoder.state_dict().items())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "teacher_dev" in log[0] and any("dev" in row for row in log)
    rr = Reranker.from_pretrained(str(tmp_path / "run" / "best"), device="cpu", dtype="float32")
    scores = rr.score("Which planet is smallest?", texts, ratio=4)
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)


def test_distillation_needs_a_teacher(backend: MiniBackend, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=1, distill=1.0)
    with pytest.raises(ValueError, match="teacher"):
        train(MiniTask(backend, EncodingCache(tmp_path, backend), cfg), TrainingData(), cfg, tmp_path / "run")


@pytest.mark.parametrize(("passage_summary", "relevance"), [(False, False), (True, False), (True, True)])
def test_fused_inference_path_equals_the_training_path(
    backend: MiniBackend, passage_summary: bool, relevance: bool
) -> None:
    dec = copy.deepcopy(backend.decoder).eval()
    if relevance:
        torch.manual_seed(5)
        dec = MiniDecoder(dataclasses.replace(dec.config, query_input="encoder", relevance_attention=True)).eval()
    dec.config = dataclasses.replace(dec.config, passage_summary=passage_summary)
    g = torch.Generator().manual_seed(1)
    passages = torch.randn(3, 5, 384, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    h_instr, h_query = torch.randn(1, 4, 384, generator=g), torch.randn(3, 6, 384, generator=g)
    q_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    with torch.no_grad():
        before = dec(h_instr, h_query, q_mask, passages, mask)  # fills the fused-weights cache
    with (
        torch.no_grad()
    ):  # perturb the adapters so that the fold is not trivially the identity (and the cache is stale)
        for adapter in dec.adapters:
            adapter.norm.weight.add_(0.3 * torch.randn(adapter.norm.weight.shape, generator=g))
            adapter.norm.bias.add_(0.3 * torch.randn(adapter.norm.bias.shape, generator=g))
            adapter.proj.weight.add_(0.05 * torch.randn(adapter.proj.weight.shape, generator=g))
            adapter.proj.bias.add_(0.1 * torch.randn(adapter.proj.bias.shape, generator=g))
    with torch.enable_grad():
        slow = dec(h_instr, h_query, q_mask, passages, mask)
    with torch.no_grad():
        fast = dec(h_instr, h_query, q_mask, passages, mask)
    assert torch.allclose(slow, fast, atol=1e-4), (slow - fast).abs().max()
    assert not torch.allclose(before, fast, atol=1e-3)  # the perturbation was seen, not a cached fold


def test_summary_window_is_the_mean_of_the_passage_at_every_ratio() -> None:
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 32, 384, generator=g)  # token states of two passages, the second padded after 16
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 16:] = 0
    token_mean = torch.stack([hidden[0].mean(0), hidden[1, :16].mean(0)])  # (2, d), the plain mean of real tokens
    for ratio in (1, 2, 4, 8, 16):  # all divide 16 and 32, so every window holds `ratio` tokens
        vectors, counts = mep_pool(hidden, mask, ratio)
        windows = (counts > 0).long()  # the 0/1 window mask the engine passes
        with_summary, summary_mask = with_summary_window(vectors, windows)
        assert with_summary.shape[1] == vectors.shape[1] + 1 and summary_mask[:, 0].eq(1).all()
        assert torch.allclose(with_summary[:, 0], token_mean, atol=1e-5), ratio
        assert torch.equal(with_summary[:, 1:], vectors) and torch.equal(summary_mask[:, 1:], windows)


@pytest.mark.parametrize(
    ("query_input", "head_pooling", "passage_summary"),
    [("encoder", "mean", False), ("embeddings", "last", False), ("encoder", "mean", True)],
)
def test_both_query_inputs_read_the_passage(query_input: str, head_pooling: str, passage_summary: bool) -> None:
    torch.manual_seed(0)
    cfg = MiniConfig(
        num_layers=1,
        init_layers=[5] if query_input == "encoder" else [0],
        query_input=query_input,
        head_pooling=head_pooling,
        passage_summary=passage_summary,
    )
    fresh = MiniBackend.fresh(cfg)
    with torch.no_grad():
        fresh.decoder.head.weight.normal_(0.0, 1.0)  # a visible head, so that passage effects show in the logit
    prompt = fresh.prompt_ids(
        "Which planet is smallest?", instruction="Rank.", system_instruction="", max_query_tokens=32
    )
    cut = prompt.index(fresh.sep_id) + 1
    texts = [ARTICLES["Mercury (planet)"][3], ARTICLES["Marie Curie"][3]]
    ids = fresh.tokenize_passages(texts, 256)
    n = max(len(x) for x in ids)
    x = torch.tensor([x + [0] * (n - len(x)) for x in ids])
    m = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    with torch.no_grad():
        logits = fresh.forward_scores(prompt[:cut], [prompt[cut:]] * 2, fresh.encode(x, m), m)
    assert torch.isfinite(logits).all() and abs(float(logits[0] - logits[1])) > 1e-4


def test_unknown_options_are_refused() -> None:
    with pytest.raises(ValueError, match="query_input"):
        MiniConfig(query_input="tokens")
    with pytest.raises(ValueError, match="head_pooling"):
        MiniConfig(head_pooling="max")
    with pytest.raises(ValueError, match="relevance_attention"):
        MiniConfig(query_input="embeddings", relevance_attention=True)
    with pytest.raises(ValueError, match="relevance_heads"):
        MiniConfig(query_input="encoder", relevance_attention=True, relevance_heads=5)


def test_source_weights_option() -> None:
    import typer

    from kalm_rag.train.command import _source_weights

    weights = _source_weights("wiki=0.5, scifact=0")
    assert (
        weights["wiki"] == 0.5
        and weights["scifact"] == 0.0
        and weights["nfcorpus"] == TrainConfig().source_weights["nfcorpus"]
    )
    with pytest.raises(typer.BadParameter):
        _source_weights("wiki")


def test_groups_mix_hard_and_random_negatives() -> None:
    from kalm_rag.train.trainer import GroupSampler

    pool = [f"other passage {i}" for i in range(50)]
    examples = [
        Example("q", ["the answer"], ["hard 1", "hard 2", "hard 3", "hard 4"], "src"),
        Example("q2", ["answer 2"], pool, "src"),
    ]
    cfg = TrainConfig(negatives=5, random_negatives=2, source_weights={"src": 1.0})
    sampler = GroupSampler(examples, cfg)
    for _ in range(30):
        query, passages = sampler.group()
        if query != "q":
            continue
        positive, negatives = passages[0], passages[1:]
        assert positive == "the answer" and len(negatives) == 5 and "the answer" not in negatives
        assert sum(n.startswith("hard") for n in negatives) >= 3  # the hard ones, plus random draws from the pool
    with pytest.raises(ValueError, match="random_negatives"):
        GroupSampler(examples, TrainConfig(negatives=2, random_negatives=3))


def test_default_cache_dir_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kalm_rag.paths import default_cache_dir

    monkeypatch.delenv("KALM_RAG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kalm-rag" / "kalm-mini"
    monkeypatch.setenv("KALM_RAG_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_relevance_attention_starts_as_the_mass_off_the_sink() -> None:
    """At its start the layer's output is ``mass * value_bias``,
    ``mass = sum_w e^{tau cos} / (e^s + sum_w e^{tau cos})``."""
    from kalm_rag.models.mini import RelevanceAttention

    cfg = MiniConfig(
        query_input="encoder", relevance_attention=True, relevance_temperature_init=7.0, relevance_sink_init=3.0
    )
    layer = RelevanceAttention(cfg)
    bias = torch.randn(384)
    with torch.no_grad():
        layer.value.bias.copy_(bias)
    g = torch.Generator().manual_seed(3)
    x, p = torch.randn(2, 3, 384, generator=g), torch.randn(2, 4, 384, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        out = layer(x, p, mask)  # (2, 3, d)
    for b in range(2):
        for t in range(3):
            sims = [
                float(torch.dot(x[b, t], p[b, w]) / (x[b, t].norm() * p[b, w].norm())) for w in range(4) if mask[b, w]
            ]
            mass = sum(math.exp(7.0 * c) for c in sims) / (math.exp(3.0) + sum(math.exp(7.0 * c) for c in sims))
            assert torch.allclose(out[b, t], mass * bias, atol=1e-5), (b, t)


def test_relevance_attention_prefers_the_passage_that_holds_the_query() -> None:
    torch.manual_seed(0)
    fresh = MiniBackend.fresh(
        MiniConfig(
            num_layers=1,
            init_layers=[5],
            query_input="encoder",
            head_pooling="mean",
            dropout=0.0,
            passage_summary=True,
            relevance_attention=True,
        )
    )
    g = torch.Generator().manual_seed(4)
    h_instr, h_query = torch.randn(1, 4, 384, generator=g), torch.randn(1, 5, 384, generator=g)
    unrelated = torch.randn(1, 8, 384, generator=g)
    holding = unrelated.clone()
    holding[0, 2:7] = h_query[0]  # five windows that are the query tokens themselves
    mask = torch.ones(1, 8, dtype=torch.long)
    q_mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        hit = fresh.decoder(h_instr, h_query, q_mask, holding, mask)
        miss = fresh.decoder(h_instr, h_query, q_mask, unrelated, mask)
    assert float(hit - miss) > 1.0  # scale 10 per unit of mass: the start reads the passage, not noise


def test_relevance_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = MiniConfig(
        num_layers=1,
        init_layers=[5],
        query_input="encoder",
        head_pooling="mean",
        passage_summary=True,
        relevance_attention=True,
        relevance_heads=2,
    )
    fresh = MiniBackend.fresh(cfg)
    fresh.decoder.eval()  # a fresh decoder is in training mode (dropout)
    with torch.no_grad():
        fresh.decoder.relevance.temperature.fill_(12.5)
    fresh.save_pretrained(tmp_path / "ckpt", weights_dtype=torch.float32)
    loaded = MiniBackend.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.relevance_attention and loaded.config.relevance_heads == 2
    assert torch.equal(loaded.decoder.relevance.temperature, torch.full((2,), 12.5))
    rr, rr_loaded = Reranker(fresh), Reranker(loaded)
    texts = [ARTICLES["Mercury (planet)"][3], ARTICLES["Marie Curie"][3]]
    a = rr.score("Which planet is smallest?", texts, ratio=4, return_margin=True)
    b = rr_loaded.score("Which planet is smallest?", texts, ratio=4, return_margin=True)
    assert a == pytest.approx(b, abs=1e-6)
