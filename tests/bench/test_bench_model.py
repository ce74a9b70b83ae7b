"""The encoder layer on the real all-MiniLM-L6-v2: pooling, heads, saving, one real fine-tune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tvq.bench import BenchError
from tvq.bench.config import preset
from tvq.bench.model import (
    class_mean_head,
    cosine_logits,
    embed,
    length_batches,
    load_encoder,
    load_tokenizer,
    save_encoder,
)
from tvq.bench.train import finetune

from bench_helpers import EXAMPLES

pytestmark = pytest.mark.usefixtures("two_torch_threads")



@pytest.fixture(scope="module")
def encoder() -> tuple[torch.nn.Module, object]:
    return load_encoder(), load_tokenizer()


def test_class_mean_head_is_normalised_class_mean() -> None:
    emb = torch.nn.functional.normalize(torch.randn(10, 4), dim=-1)
    labels = [0, 1] * 5
    head = class_mean_head(emb, labels, 2)
    assert torch.allclose(head.norm(dim=-1), torch.ones(2))
    assert torch.allclose(head[0], torch.nn.functional.normalize(emb[0::2].mean(0), dim=0), atol=1e-6)
    assert torch.allclose(cosine_logits(emb, head, 20.0), 20 * emb @ head.T)
    with pytest.raises(BenchError, match=r"classes \[2\]"):
        class_mean_head(emb, labels, 3)


def test_length_batches_cover_every_index_once() -> None:
    lengths = [5, 1, 9, 3, 3, 7, 2, 8, 6, 4] * 7
    sorted_batches = length_batches(lengths, 8)
    assert sorted(i for b in sorted_batches for i in b) == list(range(70))
    assert [lengths[i] for b in sorted_batches for i in b] == sorted(lengths)
    a = length_batches(lengths, 8, torch.Generator().manual_seed(1), pool=2)
    b = length_batches(lengths, 8, torch.Generator().manual_seed(1), pool=2)
    assert a == b and sorted(i for x in a for i in x) == list(range(70))


def test_real_heads_and_embeddings(encoder) -> None:
    model, tok = encoder
    texts = [t for t, _ in EXAMPLES]
    emb = embed(model, tok, texts, max_length=32, batch_size=5)
    assert emb.shape == (32, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(32), atol=1e-5)
    # dynamic padding and length sorting do not change a text's embedding
    alone = embed(model, tok, texts[3:4], max_length=32)
    assert torch.allclose(alone[0], emb[3], atol=1e-5)
    head = class_mean_head(emb, [y for _, y in EXAMPLES], 2)
    acc = (cosine_logits(emb, head).argmax(-1) == torch.tensor([y for _, y in EXAMPLES])).float().mean()
    assert acc > 0.9  # pretrained MiniLM separates animals from computers


def test_save_encoder_matches_pretrained_keys(encoder, tmp_path: Path, minilm_dir: Path) -> None:
    model, _ = encoder
    save_encoder(model, minilm_dir, tmp_path / "m")
    with safe_open(str(minilm_dir / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as b:
        keys = list(a.keys())
        assert keys == list(b.keys())  # position_ids buffer included
        for k in keys:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    for name in ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (tmp_path / "m" / name).is_file()
    assert not (tmp_path / "m" / "README.md").exists()
    again = load_encoder(tmp_path / "m")
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(again.state_dict()[key], model.state_dict()[key])


def test_one_real_finetune_lowers_the_loss(encoder) -> None:
    model, tok = encoder
    model = load_encoder()  # a fresh copy: this test changes its weights
    config = preset("ci", max_length=16, epochs=4, lr=1e-4, batch_size=8)
    emb = embed(model, tok, [t for t, _ in EXAMPLES], 16)
    labels = torch.tensor([y for _, y in EXAMPLES])
    head = class_mean_head(emb, labels.tolist(), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss() -> float:
        e = embed(model, tok, [t for t, _ in EXAMPLES], 16)
        return float(torch.nn.functional.cross_entropy(cosine_logits(e, head, 20.0), labels))

    start = loss()
    stats = finetune(model, tok, head, EXAMPLES, config, seed=0, progress=False)
    assert stats["steps"] == 16 and stats["trainable"] < sum(p.numel() for p in model.parameters())
    assert loss() < 0.8 * start
    after = model.state_dict()
    assert torch.equal(after["embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])  # frozen
    assert not torch.equal(after["encoder.layer.5.output.dense.weight"], before["encoder.layer.5.output.dense.weight"])
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_finetune_is_reproducible(encoder) -> None:
    _, tok = encoder
    config = preset("ci", max_length=16, epochs=1, batch_size=16)
    a, b = load_encoder(), load_encoder()
    head = class_mean_head(embed(a, tok, [t for t, _ in EXAMPLES], 16), [y for _, y in EXAMPLES], 2)
    finetune(a, tok, head, EXAMPLES, config, seed=7, progress=False)
    torch.manual_seed(123)  # the global RNG must not matter
    finetune(b, tok, head, EXAMPLES, config, seed=7, progress=False)
    k = "encoder.layer.2.intermediate.dense.weight"
    assert torch.equal(a.state_dict()[k], b.state_dict()[k])
