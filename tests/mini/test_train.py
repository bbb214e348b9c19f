"""kalm-mini training pieces: the loss, the teacher, the data sources, echo negatives, calibration, a short run.

The teacher is checked against plain transformers (all-MiniLM-L6-v2 with mean pooling), not against itself.
"""

from __future__ import annotations

import copy
import gzip
import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kalm_rag import Reranker
from kalm_rag.models.mini import MiniBackend, MiniConfig, encoder_dir
from kalm_rag.models.mini.modeling import RelevanceAttention, with_summary_window
from kalm_rag.pooling import mep_pool
from kalm_rag.train.cache import EncodingCache
from kalm_rag.train.calibrate import calibration_report, fit_temperature_and_bias
from kalm_rag.train.data import (
    DevQuery,
    Example,
    TrainingData,
    add_echo_negatives,
    echo_passage,
    squad_examples,
    wiki_examples,
    wiki_queries,
    wiki_summaries_file,
)
from kalm_rag.train.prepare import TRAINING_SOURCES, training_manifest
from kalm_rag.train.trainer import BiEncoderTeacher, GroupSampler, MiniTask, TrainConfig, group_loss, train

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
    return MiniBackend.fresh()


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
    assert wiki_queries("Marie Curie", "", "People") == ["Who was Marie Curie?"]


def test_wiki_examples_pair_each_query_with_its_own_summary(tmp_path: Path) -> None:
    examples = wiki_examples(write_summaries(tmp_path / "s.json"), negatives=2, limit=None)
    by_query = {ex.query: ex for ex in examples}
    assert by_query["Who was Marie Curie?"].pos == [ARTICLES["Marie Curie"][3]]
    for ex in examples:
        assert ex.pos[0] not in ex.neg and len(ex.neg) == 2


def test_the_installed_wiki_summaries_are_found() -> None:
    path = wiki_summaries_file()
    assert path.is_file() and path.stat().st_size > 1_000_000


def _write_squad(folder: Path) -> None:
    """A tiny SQuAD folder in the layout of ../shared/data/squad/train."""
    corpus = [
        ("train-0-0", "Mercury", "Mercury is the smallest planet and the closest to the Sun."),
        ("train-0-1", "Mercury", "Mercury has no moons; the smallest planet is also the fastest."),
        ("train-0-2", "Mercury", "Mercury was named after a Roman god of travellers."),
        ("train-1-0", "Curie", "Marie Curie won two Nobel Prizes, in physics and chemistry."),
    ]
    queries = [
        ("q0", "Which planet is the smallest?", ["smallest planet"]),
        ("q1", "Who was Mercury named after?", ["a Roman god"]),
    ]
    (folder / "qrels").mkdir(parents=True)
    with gzip.open(folder / "corpus.jsonl.gz", "wt") as fh:
        for i, t, x in corpus:
            fh.write(json.dumps({"_id": i, "title": t, "text": x}) + "\n")
    with gzip.open(folder / "queries.jsonl.gz", "wt") as fh:
        for i, t, a in queries:
            fh.write(json.dumps({"_id": i, "text": t, "answers": a}) + "\n")
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\nq0\ttrain-0-0\t1\nq1\ttrain-0-2\t1\n")
    with gzip.open(folder / "hard_negatives.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"query-id": "q0", "neg": ["train-0-1", "train-0-2"]}) + "\n")
        fh.write(json.dumps({"query-id": "q1", "neg": ["train-0-1", "train-0-0"]}) + "\n")


def test_squad_negatives_never_contain_the_answer(tmp_path: Path) -> None:
    _write_squad(tmp_path / "squad")
    examples = {ex.query: ex for ex in squad_examples(tmp_path / "squad", negatives=5)}
    smallest = examples["Which planet is the smallest?"]
    assert smallest.pos == ["Mercury Mercury is the smallest planet and the closest to the Sun."]
    # train-0-1 is a listed hard negative but holds the answer string "smallest planet": never a negative
    assert all("smallest planet" not in n for n in smallest.neg)
    assert "Mercury Mercury was named after a Roman god of travellers." in smallest.neg
    assert all(ex.source == "squad" for ex in examples.values())


def test_echo_passages_repeat_the_query_without_the_answer() -> None:
    rng = random.Random(0)
    filler = "Bananas are rich in potassium. They grow in tropical regions. Their peel is yellow when ripe."
    seen = set()
    for _ in range(40):
        echo = echo_passage("When did World War II end?", filler, rng)
        assert "1945" not in echo
        assert "World" in echo  # the query, or its shuffled content words
        seen.add(echo.split(" ")[0])
    assert len(seen) > 3  # several templates, not one fixed pattern


def test_echo_negatives_are_sampled_and_never_rated_relevant_by_the_teacher(
    backend: MiniBackend, tmp_path: Path
) -> None:
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
    added = add_echo_negatives(examples, fraction=1.0, seed=0)
    assert added == sum(bool(ex.echo) for ex in examples) >= 3  # a draw of its own query as filler is skipped
    examples = [ex for ex in examples if ex.echo]
    sampler = GroupSampler(
        examples, TrainConfig(negatives=3, random_negatives=1, echo_probability=1.0, source_weights={"wiki": 1.0})
    )
    group = sampler.group()
    assert group.echo == 3 and group.query in group.passages[group.echo]
    cache = EncodingCache(tmp_path / "cache", backend)
    cache.ensure(group.passages)
    teacher = BiEncoderTeacher(backend, cache, scale=20.0)
    plain = teacher.logits([group.query], [group.passages])[0]
    fixed = teacher.group_logits([group])[0]
    assert float(fixed[group.echo]) < float(plain.min())  # cosine likes the echo; the teacher target does not
    assert torch.equal(
        torch.cat([fixed[: group.echo], fixed[group.echo + 1 :]]),
        torch.cat([plain[: group.echo], plain[group.echo + 1 :]]),
    )


def test_teacher_is_minilm_cosine(backend: MiniBackend, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    cache = EncodingCache(tmp_path / "cache", backend)
    passages = [[ARTICLES["Photosynthesis"][3], ARTICLES["Marie Curie"][3]]]
    cache.ensure(passages[0])
    got = BiEncoderTeacher(backend, cache, scale=20.0).logits(["How do plants make food?"], passages)
    path = encoder_dir(backend.config.encoder_spec)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts: list[str]) -> torch.Tensor:
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
    add_echo_negatives(examples, fraction=0.5, seed=1)
    dev = [DevQuery("Which planet is smallest?", texts, [0, 0, 1, 0], "wiki")]
    data = TrainingData(examples, dev)
    cache = EncodingCache(tmp_path / "cache", backend)
    cache.ensure(data.passages())
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
    student = copy.deepcopy(backend)
    before = {k: v.clone() for k, v in student.decoder.state_dict().items()}
    summary = train(
        MiniTask(student, cache, cfg), data, cfg, tmp_path / "run", BiEncoderTeacher(student, cache, scale=20.0)
    )
    assert summary["steps_run"] == 3 and 0.0 <= summary["best_dev_ndcg10"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in student.decoder.state_dict().items())
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert "teacher_dev" in log[0] and any("dev" in row for row in log)
    rr = Reranker.from_pretrained(str(tmp_path / "run" / "best"), device="cpu", dtype="float32")
    scores = rr.score("Which planet is smallest?", texts, ratio=4)
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)


def test_distillation_needs_a_teacher(backend: MiniBackend, tmp_path: Path) -> None:
    cfg = TrainConfig(steps=1, distill=1.0)
    with pytest.raises(ValueError, match="teacher"):
        train(MiniTask(backend, EncodingCache(tmp_path, backend), cfg), TrainingData(), cfg, tmp_path / "run")


def test_fused_inference_path_equals_the_training_path(backend: MiniBackend) -> None:
    torch.manual_seed(5)
    dec = copy.deepcopy(backend.decoder).eval()
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


def test_config_refuses_unknown_keys_and_encoders() -> None:
    with pytest.raises(ValueError, match="unknown kalm-mini config keys"):
        MiniConfig.from_dict({"model_type": "kalm-mini", "query_input": "embeddings"})
    with pytest.raises(ValueError, match="unknown encoder"):
        MiniConfig(encoder="os")
    with pytest.raises(ValueError, match="init_layers"):
        MiniConfig(num_layers=3)
    with pytest.raises(ValueError, match="score_scale"):
        MiniConfig(score_scale=0.0)


def test_groups_mix_hard_and_random_negatives() -> None:
    pool = [f"other passage {i}" for i in range(50)]
    examples = [
        Example("q", ["the answer"], ["hard 1", "hard 2", "hard 3", "hard 4"], "src"),
        Example("q2", ["answer 2"], pool, "src"),
    ]
    cfg = TrainConfig(negatives=5, random_negatives=2, source_weights={"src": 1.0})
    sampler = GroupSampler(examples, cfg)
    for _ in range(30):
        group = sampler.group()
        if group.query != "q":
            continue
        positive, negatives = group.passages[0], group.passages[1:]
        assert positive == "the answer" and len(negatives) == 5 and "the answer" not in negatives
        assert sum(n.startswith("hard") for n in negatives) >= 3  # the hard ones, plus random draws from the pool
    with pytest.raises(ValueError, match="random_negatives"):
        GroupSampler(examples, TrainConfig(negatives=2, random_negatives=3))
    with pytest.raises(ValueError, match="no sampling weight"):
        GroupSampler(examples, TrainConfig(source_weights={"other": 1.0}))


def test_default_cache_dir_is_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kalm_rag.paths import default_cache_dir

    monkeypatch.delenv("KALM_RAG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "kalm-rag" / "kalm-mini"
    monkeypatch.setenv("KALM_RAG_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_relevance_attention_starts_as_the_mass_off_the_sink() -> None:
    """At its start the layer's output is ``mass * value_bias``.

    ``mass = sum_w e^{tau cos} / (e^s + sum_w e^{tau cos})``.
    """
    layer = RelevanceAttention(MiniConfig(relevance_temperature_init=7.0, relevance_sink_init=3.0))
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


def test_relevance_attention_prefers_the_passage_that_holds_the_query(backend: MiniBackend) -> None:
    g = torch.Generator().manual_seed(4)
    h_instr, h_query = torch.randn(1, 4, 384, generator=g), torch.randn(1, 5, 384, generator=g)
    unrelated = torch.randn(1, 8, 384, generator=g)
    holding = unrelated.clone()
    holding[0, 2:7] = h_query[0]  # five windows that are the query tokens themselves
    mask = torch.ones(1, 8, dtype=torch.long)
    q_mask = torch.ones(1, 5, dtype=torch.long)
    decoder = copy.deepcopy(backend.decoder).eval()
    with torch.no_grad():
        hit = decoder(h_instr, h_query, q_mask, holding, mask)
        miss = decoder(h_instr, h_query, q_mask, unrelated, mask)
    assert float(hit - miss) > 1.0  # scale 10 per unit of mass: the start reads the passage, not noise


def test_checkpoint_round_trip_keeps_scores_and_calibration(backend: MiniBackend, tmp_path: Path) -> None:
    fresh = copy.deepcopy(backend)
    fresh.decoder.eval()
    fresh.config.score_scale, fresh.config.score_bias = 0.5, -1.25
    with torch.no_grad():
        fresh.decoder.relevance.temperature.fill_(12.5)
    fresh.save_pretrained(tmp_path / "ckpt", weights_dtype=torch.float32)
    loaded = MiniBackend.from_pretrained(tmp_path / "ckpt")
    assert (loaded.config.score_scale, loaded.config.score_bias) == (0.5, -1.25)
    assert torch.equal(loaded.decoder.relevance.temperature, torch.full((1,), 12.5))
    texts = [ARTICLES["Mercury (planet)"][3], ARTICLES["Marie Curie"][3]]
    a = Reranker(fresh).score("Which planet is smallest?", texts, ratio=4, return_margin=True)
    b = Reranker(loaded).score("Which planet is smallest?", texts, ratio=4, return_margin=True)
    assert a == pytest.approx(b, abs=1e-6)


def test_calibration_recovers_a_known_temperature_and_bias() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, generator=g) * 3.0
    true_a, true_b = 0.7, -1.5
    y = (torch.rand(4000, generator=g) < torch.sigmoid(true_a * z + true_b)).long()
    a, b = fit_temperature_and_bias(z.tolist(), y.tolist())
    assert a == pytest.approx(true_a, rel=0.1)  # labels drawn from sigmoid(true_a * z + true_b): recovered
    assert b == pytest.approx(true_b, abs=0.2)
    with pytest.raises(ValueError, match="both"):
        fit_temperature_and_bias([1.0, 2.0], [1, 1])


def test_calibration_report_counts() -> None:
    report = calibration_report([0.9, 0.8, 0.2, 0.6, 0.1], [1, 0, 1, 0, 0])
    assert report.pairs == 5 and report.positives == 2
    assert report.precision_at_05 == pytest.approx(1 / 3) and report.recall_at_05 == pytest.approx(1 / 2)
    perfect = calibration_report([1.0, 0.0], [1, 0])
    assert perfect.ece == 0.0


def test_manifest_lists_every_source_with_its_licence() -> None:
    data = TrainingData(
        [Example("q", ["p"], ["n"], "squad"), Example("q2", ["p2"], ["n2"], "medquad")],
        [DevQuery("d", ["p"], [1], "squad-dev")],
    )
    manifest = training_manifest(data)
    ids = {s["id"]: s for s in manifest["training_data"]}
    assert set(ids) == {"squad", "medquad"}
    assert ids["squad"]["licence"] == "CC BY-SA 4.0" and ids["squad"]["queries"] == 1
    assert all("NC" not in info["licence"] for info in TRAINING_SOURCES.values())
    with pytest.raises(ValueError, match="licence"):
        training_manifest(TrainingData([Example("q", ["p"], ["n"], "scifact")], []))


def write_extra_source(folder: Path, name: str) -> None:
    (folder / name).mkdir(parents=True)
    rows = [
        {"query": f"what does gene {i} do", "pos": [f"Gene {i} encodes a kinase in cell type {i}."], "neg": []}
        for i in range(6)
    ]
    with gzip.open(folder / name / "train.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")


def test_extra_train_sources_are_licence_checked_and_listed(tmp_path: Path) -> None:
    from kalm_rag.train.prepare import extra_train_examples

    write_extra_source(tmp_path / "extra-train", "tatqa")
    examples = extra_train_examples(tmp_path / "extra-train", negatives=3)
    assert len(examples) == 6 and {ex.source for ex in examples} == {"tatqa"}
    assert all(ex.pos[0] not in ex.neg and len(ex.neg) == 3 for ex in examples)  # BM25 negatives, never the answer
    manifest = training_manifest(TrainingData(examples, []))
    assert [s["id"] for s in manifest["training_data"]] == ["tatqa"]
    assert manifest["training_data"][0]["licence"] == "CC BY 4.0"
    write_extra_source(tmp_path / "extra-train", "unlicensed")
    with pytest.raises(ValueError, match="licence"):
        extra_train_examples(tmp_path / "extra-train")


def test_rows_in_length_chunks_give_the_logits_of_one_batch(backend: MiniBackend, tmp_path: Path) -> None:
    texts = [v[3] for v in ARTICLES.values()] + [" ".join(f"word{i}" for i in range(700))]
    cache = EncodingCache(tmp_path / "cache", backend, max_tokens=1024)
    cache.ensure(texts)
    queries, passages = ["Which planet is smallest?", "Who was Curie?"], [texts[:3], texts[2:]]
    decoder = copy.deepcopy(backend)
    decoder.decoder.eval()
    with torch.no_grad():
        one = MiniTask(decoder, cache, TrainConfig(chunk_rows=100)).logits(queries, passages, 4)
        chunked = MiniTask(decoder, cache, TrainConfig(chunk_rows=2)).logits(queries, passages, 4)
    assert torch.allclose(one, chunked, atol=1e-5)
    # training reads a long passage up to max_passage_tokens: exactly the encoding at that limit
    assert cache.get(texts[-1]).shape[0] > 512
    ids = backend.tokenize_passages([texts[-1]], 512)[0]
    x = torch.tensor([ids])
    want = backend.encode(x, torch.ones_like(x))[0]
    torch.testing.assert_close(cache.get(texts[-1])[:512], want.float(), atol=2e-2, rtol=0)  # fp16 cache


def test_training_continues_from_a_checkpoint_saved_before_the_cosine_skip(
    backend: MiniBackend, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from kalm_rag.errors import ModelLoadError

    backend.save_pretrained(tmp_path / "old", weights_dtype=torch.float32)
    state = load_file(str(tmp_path / "old" / "model.safetensors"))
    del state["cosine_weight"]  # a kalm-mini 1.0 checkpoint has no skip
    save_file(state, str(tmp_path / "old" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing"):
        MiniBackend.from_pretrained(tmp_path / "old")  # inference loading stays strict
    continued = MiniBackend.continue_from(tmp_path / "old")
    assert continued.decoder.cosine_weight.item() == MiniConfig().cosine_weight_init
    for key, value in state.items():
        assert torch.equal(continued.decoder.state_dict()[key], value), key
    del state["head.bias"]  # anything else missing is a damaged checkpoint, not an older one
    save_file(state, str(tmp_path / "old" / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="head.bias"):
        MiniBackend.continue_from(tmp_path / "old")


def test_the_instruction_is_encoded_once_per_instruction(backend: MiniBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    rr = Reranker(backend)
    texts = [ARTICLES["Mercury (planet)"][3], ARTICLES["Marie Curie"][3]]
    rr.score("Which planet is smallest?", texts)  # warm: the default instruction is cached
    calls: list[int] = []
    encode = backend.encode_segments

    def spy(segments, prefix=()):
        calls.append(len(segments))
        return encode(segments, prefix)

    monkeypatch.setattr(backend, "encode_segments", spy)
    first = rr.score("Which planet is smallest?", texts, return_margin=True)
    assert len(calls) == 0  # the query's states are kept too (the warm call encoded it)
    other = rr.score("Which planet is smallest?", texts, instruction="Find the biography.", return_margin=True)
    assert len(calls) == 1  # a new instruction is encoded
    assert other != first  # and used
    again = rr.score("Which planet is smallest?", texts, return_margin=True)
    assert len(calls) == 1 and again == first
    rr.score("Which planet is largest?", texts, return_margin=True)
    assert len(calls) == 2  # a new query is encoded, the default instruction is not


@pytest.mark.parametrize("same_query", [False, True])
def test_folded_passage_attention_equals_the_training_path(backend: MiniBackend, same_query: bool) -> None:
    # inference folds the passage key/value maps into the query side when that is cheaper (short queries,
    # many passage vectors) and shares the first layer's query projections when every row is the same query
    dec = copy.deepcopy(backend.decoder).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for adapter in dec.adapters:  # not the identity start
            adapter.norm.weight.add_(0.3 * torch.randn(adapter.norm.weight.shape, generator=g))
            adapter.proj.bias.add_(0.1 * torch.randn(adapter.proj.bias.shape, generator=g))
    passages = torch.randn(3, 40, 384, generator=g)
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:], mask[2, 3:] = 0, 0
    h_instr = torch.randn(1, 4, 384, generator=g)
    if same_query:
        h_query, q_mask = torch.randn(1, 6, 384, generator=g).expand(3, -1, -1), torch.ones(3, 6, dtype=torch.long)
    else:
        h_query = torch.randn(3, 6, 384, generator=g)
        q_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    assert dec.folding_pays(6, 41) and not dec.folding_pays(40, 41)
    with torch.enable_grad():
        slow = dec(h_instr, h_query.contiguous(), q_mask, passages, mask)
    with torch.no_grad():
        fast = dec(h_instr, h_query, q_mask, passages, mask)
    assert torch.allclose(slow, fast, atol=1e-4), (slow - fast).abs().max()
